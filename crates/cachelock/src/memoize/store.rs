//! Reading and writing whole values: inline items, or chunks then a
//! manifest.

use std::borrow::Cow;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use std::time::Duration;

use super::codec::{self, Checksum, Corrupt, Entry, INLINE_OVERHEAD, Manifest, ManifestBody};
use super::fresh::{Envelope, State, classify, now_ms};
use super::{Ctx, Seen};
use crate::backend::SharedBackend;
use crate::lock::LockGuard;

/// The most chunks one memoize read fetches (in one `get_many`). A manifest
/// claiming more is refused (the value would not fit in memory anyway).
const MAX_READ_CHUNKS: u32 = 65_536;

/// The most plaintext one memoize value may have: 1 GiB.
const MAX_VALUE_LEN: u64 = 1 << 30;

/// The most bytes one `set_many` batch carries.
pub(crate) const BATCH_BYTES: usize = 8 << 20;

/// What a read found.
pub(crate) enum ReadOutcome<T> {
    /// A fresh value, and its plaintext (postcard) bytes (shared with
    /// the stored item when it is stored plainly: no copy).
    Hit(T, Bytes),
    /// A value that is not plainly fresh (see [`State`]): early refresh,
    /// stale, or expired but kept for stale-if-error.
    Stale(T, Found),
    /// Nothing stored, a tombstone, or another namespace generation.
    Miss,
    /// Something stored but unusable (corrupt, foreign, undecodable), or
    /// the read failed. Already logged.
    Unusable,
}

/// The envelope of a value that is not plainly fresh, and its state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Found {
    pub(crate) env: Envelope,
    pub(crate) state: State,
}

impl Found {
    /// Whether a plain read may hand it out (not past its stale window).
    pub(crate) fn servable(&self) -> bool {
        self.state != State::Expired
    }

    /// Whether stale-if-error still allows serving it.
    pub(crate) fn within_error_window(&self) -> bool {
        now_ms() < self.env.error_until_ms.max(self.env.stale_until_ms)
    }
}

/// Decodes a single value's plaintext; trailing bytes are an error.
pub(crate) fn decode_value<T: DeserializeOwned>(plain: &[u8]) -> Result<T, Corrupt> {
    match postcard::take_from_bytes::<T>(plain) {
        Ok((v, [])) => Ok(v),
        Ok(_) => Err(Corrupt("trailing bytes after the value")),
        Err(_) => Err(Corrupt("value does not decode as the requested type")),
    }
}

pub(crate) fn log_corrupt(key: &str, reason: &Corrupt) {
    tracing::warn!(%key, %reason, "Failed to fetch data from cache: corrupt or unreadable entry; rebuilding it");
}

/// Reads and decodes the value under `ctx.key`.
pub(crate) async fn read_value<T: DeserializeOwned>(ctx: &Ctx<'_>) -> ReadOutcome<T> {
    read(ctx, true).await
}

/// As [`read_value`], without keeping the plaintext of an inline hit (the
/// hit path hands out only the value).
pub(crate) async fn read_value_only<T: DeserializeOwned>(ctx: &Ctx<'_>) -> ReadOutcome<T> {
    read(ctx, false).await
}

/// Parses a decimal counter (absent or unreadable: 0).
fn counter(raw: Option<&Bytes>) -> u64 {
    raw.and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The keys one read fetches, in one round trip: the value's, then the
/// namespace generation counter's if namespace invalidation is on.
pub(crate) struct ReadKeys<'c> {
    keys: [&'c str; 2],
    len: usize,
}

impl<'c> std::ops::Deref for ReadKeys<'c> {
    type Target = [&'c str];

    fn deref(&self) -> &Self::Target {
        &self.keys[..self.len]
    }
}

/// Which keys a read of `ctx.key` fetches (see [`ReadKeys`]); what they
/// hold goes to [`decode_found`], in the same order.
pub(crate) fn read_keys<'c>(ctx: &'c Ctx<'_>) -> ReadKeys<'c> {
    match &ctx.config.generation_key {
        Some(g) => ReadKeys {
            keys: [ctx.key.as_str(), g.as_str()],
            len: 2,
        },
        None => ReadKeys {
            keys: [ctx.key.as_str(), ""],
            len: 1,
        },
    }
}

/// Fetches [`read_keys`] (a plain `get` when it is the value's alone).
/// `None` if the read failed (logged).
async fn fetch(ctx: &Ctx<'_>) -> Option<[Option<Bytes>; 2]> {
    let keys = read_keys(ctx);
    if keys.len() == 1 {
        return match ctx.cache.get(&ctx.key).await {
            Ok(v) => Some([v, None]),
            Err(e) => {
                tracing::error!(key = %ctx.key, error = %e, "Error fetching data from cache for key");
                None
            }
        };
    }
    match ctx.cache.get_many(&keys).await {
        Ok(found) if found.len() == keys.len() => {
            let mut out = [None, None];
            for (slot, v) in out.iter_mut().zip(found) {
                *slot = v;
            }
            Some(out)
        }
        Ok(_) => {
            tracing::error!(key = %ctx.key, "backend returned the wrong number of values");
            None
        }
        Err(e) => {
            tracing::error!(key = %ctx.key, error = %e, "Error fetching data from cache for key");
            None
        }
    }
}

/// The namespace generation among what [`read_keys`] fetched, if it is on.
fn generation_in(ctx: &Ctx<'_>, found: &[Option<Bytes>]) -> Option<u64> {
    ctx.config
        .generation_key
        .as_ref()
        .map(|_| counter(found.get(1).and_then(Option::as_ref)))
}

/// Reads what a write-back must find unchanged, without decoding it: for
/// a forced overwrite, which reads nothing else before its compute.
pub(crate) async fn read_seen(ctx: &Ctx<'_>) {
    if let Some(mut found) = fetch(ctx).await {
        let generation = generation_in(ctx, &found).unwrap_or(0);
        ctx.see(Seen {
            raw: found[0].take(),
            generation,
            expired: false,
        });
    }
}

async fn read<T: DeserializeOwned>(ctx: &Ctx<'_>, keep_plain: bool) -> ReadOutcome<T> {
    match fetch(ctx).await {
        Some(mut found) => decode_found(ctx, &mut found[..read_keys(ctx).len()], keep_plain).await,
        None => ReadOutcome::Unusable,
    }
}

/// Decodes what a read of [`read_keys`] found (`found` in the same order).
/// Unless it is a hit, remembers the raw value (or its absence) and the
/// generation, which the write-back of a compute that follows expects
/// ([`Ctx::seen`]).
pub(crate) async fn decode_found<T: DeserializeOwned>(
    ctx: &Ctx<'_>,
    found: &mut [Option<Bytes>],
    keep_plain: bool,
) -> ReadOutcome<T> {
    let generation = generation_in(ctx, found);
    let raw = found.first_mut().and_then(Option::take);
    let outcome = match &raw {
        Some(raw) => decode_raw(ctx, raw, generation, keep_plain).await,
        None => ReadOutcome::Miss,
    };
    if !matches!(outcome, ReadOutcome::Hit(..)) {
        let expired = matches!(&outcome, ReadOutcome::Stale(_, found)
            if found.state == State::Expired && !found.within_error_window());
        ctx.see(Seen {
            raw,
            generation: generation.unwrap_or(0),
            expired,
        });
    }
    outcome
}

/// Decodes one stored item of a value and classifies it.
async fn decode_raw<T: DeserializeOwned>(
    ctx: &Ctx<'_>,
    raw: &Bytes,
    generation: Option<u64>,
    keep_plain: bool,
) -> ReadOutcome<T> {
    let (marked, item) = codec::strip_stale_mark(raw);
    let decoded: Result<Option<(T, Bytes, Envelope)>, Corrupt> =
        match ctx
            .codec
            .decode_entry(&ctx.key, item, ctx.cache.max_value_size())
        {
            Ok(Entry::Gone) => Ok(None),
            Ok(Entry::Inline {
                stream: false,
                enveloped,
                plain,
            }) => split(enveloped, &plain).and_then(|(env, body)| {
                let v = decode_value::<T>(body)?;
                let plain = if !keep_plain {
                    Bytes::new()
                } else {
                    match &plain {
                        Cow::Borrowed(s) => sub_bytes(raw, &s[s.len() - body.len()..]),
                        Cow::Owned(_) => Bytes::copy_from_slice(body),
                    }
                };
                Ok(Some((v, plain, env)))
            }),
            Ok(Entry::Manifest(m)) if !m.stream => read_chunks(ctx, &m).await.and_then(|p| {
                let (env, body) = split(m.enveloped, &p)?;
                let v = decode_value::<T>(body)?;
                Ok(Some((v, Bytes::copy_from_slice(body), env)))
            }),
            Ok(_) => Err(Corrupt("a stream is stored under this key, not a value")),
            Err(c) => Err(c),
        };
    match decoded {
        Ok(Some((v, p, env))) => {
            let state = classify(
                &env,
                now_ms,
                ctx.cache.exact_expiry(),
                generation,
                marked,
                ctx.call.expiration.early_refresh_beta(),
                || ctx.rng.unit(),
            );
            match state {
                State::Fresh => ReadOutcome::Hit(v, p),
                State::Gone => ReadOutcome::Miss,
                state => ReadOutcome::Stale(v, Found { env, state }),
            }
        }
        Ok(None) => {
            tracing::debug!(key = %ctx.key, "invalidated (or older) entry; a miss");
            ReadOutcome::Miss
        }
        Err(c) => {
            log_corrupt(&ctx.key, &c);
            ReadOutcome::Unusable
        }
    }
}

/// Marks the value under `key` stale (soft invalidation, see
/// [`fresh`](super::fresh)): its item gets a new stale mark, or where
/// there is none (absent, a tombstone) a new tombstone is written, with a
/// compare-and-set over what was read; a few tries, then a tombstone.
/// `fallback_ttl` is the marked item's TTL where the backend cannot tell
/// the remaining one.
///
/// # Errors
///
/// What the backend failed with.
pub(crate) async fn mark_stale(
    backend: &SharedBackend,
    key: &str,
    fallback_ttl: Duration,
) -> crate::error::BackendResult<()> {
    for _ in 0..MARK_TRIES {
        let raw = backend.get(key).await?;
        let (next, ttl) = match &raw {
            Some(r) if !codec::is_tombstone(r) => {
                let ttl = backend.ttl(key).await?.unwrap_or(fallback_ttl);
                if ttl < MARK_MIN_TTL {
                    // About to expire (or past its hard end, kept by a
                    // coarse TTL): a mark would go with it, and a compute
                    // that started before would no longer be fenced.
                    (codec::tombstone(), TOMBSTONE_TTL)
                } else {
                    (codec::mark_stale(r), ttl)
                }
            }
            _ => (codec::tombstone(), TOMBSTONE_TTL),
        };
        if backend.set_if(key, raw.as_deref(), &next, ttl).await? {
            return Ok(());
        }
    }
    tracing::debug!(%key, "the value kept changing while being marked stale; invalidating it");
    backend.set(key, &codec::tombstone(), TOMBSTONE_TTL).await
}

/// Hard invalidation: a tombstone under `key`.
///
/// # Errors
///
/// What the backend failed with.
pub(crate) async fn invalidate(
    backend: &SharedBackend,
    key: &str,
) -> crate::error::BackendResult<()> {
    backend.set(key, &codec::tombstone(), TOMBSTONE_TTL).await
}

/// The shortest TTL a stale mark is written with; an item with less left
/// gets a tombstone instead. Longer than a coarse-TTL backend keeps a value
/// past its hard end (Memcached: about two seconds), which is what
/// [`Over::or_absent`] relies on.
const MARK_MIN_TTL: Duration = Duration::from_secs(5);

/// Tries of [`mark_stale`]'s compare-and-set before it writes a tombstone.
const MARK_TRIES: usize = 4;

/// How long a tombstone lives: longer than any compute that started
/// before it (one that read the value's absence must still find the
/// tombstone when it writes back).
const TOMBSTONE_TTL: Duration = super::options::DEFAULT_EXPIRATION;

/// Splits the envelope off a value's plaintext.
fn split(enveloped: bool, plain: &[u8]) -> Result<(Envelope, &[u8]), Corrupt> {
    if !enveloped {
        return Err(Corrupt("a value without a freshness envelope"));
    }
    Envelope::decode(plain).ok_or(Corrupt("bad freshness envelope"))
}

/// `s` (a slice of `raw`) as a `Bytes` sharing `raw`'s memory; a copy if
/// it is not inside `raw` after all.
fn sub_bytes(raw: &Bytes, s: &[u8]) -> Bytes {
    let base = raw.as_ptr() as usize;
    let start = (s.as_ptr() as usize).wrapping_sub(base);
    match start.checked_add(s.len()) {
        Some(end) if s.as_ptr() as usize >= base && end <= raw.len() => raw.slice(start..end),
        _ => Bytes::copy_from_slice(s),
    }
}

/// Chunks asked for in one `get_many`: a value of up to 64 chunks (64 MiB
/// at the default chunk size) is one round trip, and a manifest that claims
/// many chunks that are not there costs one batch, not a request for every
/// key it claims.
const READ_BATCH: u32 = 64;

/// Fetches the chunks of `m`, [`READ_BATCH`] per `get_many`, stopping at the
/// first batch with a hole, and joins them.
async fn read_chunks(ctx: &Ctx<'_>, m: &Manifest) -> Result<Vec<u8>, Corrupt> {
    if m.body.chunk_count > MAX_READ_CHUNKS || m.body.total_len > MAX_VALUE_LEN {
        return Err(Corrupt("manifest describes a value too large to read"));
    }
    let mut raws = Vec::new();
    let mut start = 0;
    while start < m.body.chunk_count {
        let end = start.saturating_add(READ_BATCH).min(m.body.chunk_count);
        raws.extend(fetch_raw(ctx, m, start, end).await?);
        start = end;
    }
    // Reserve what the stored bytes can really expand to, not what the
    // manifest claims.
    let stored: usize = raws.iter().map(Bytes::len).sum();
    let claimed = usize::try_from(m.body.total_len).unwrap_or(usize::MAX);
    let mut out = Vec::with_capacity(claimed.min(stored.saturating_mul(255)));
    let mut sum = Checksum::new();
    for (i, raw) in (0..m.body.chunk_count).zip(&raws) {
        let plain = ctx.codec.decode_chunk(&ctx.key, m, i, raw)?;
        sum.update(&plain);
        out.extend_from_slice(&plain);
    }
    if sum.digest() != m.body.checksum || out.len() as u64 != m.body.total_len {
        return Err(Corrupt("value checksum mismatch"));
    }
    Ok(out)
}

/// Fetches and decodes chunks `start..end` of `m` with one `get_many`.
pub(crate) async fn fetch_chunks(
    ctx: &Ctx<'_>,
    m: &Manifest,
    start: u32,
    end: u32,
) -> Result<Vec<Vec<u8>>, Corrupt> {
    let raws = fetch_raw(ctx, m, start, end).await?;
    (start..end)
        .zip(&raws)
        .map(|(i, raw)| {
            ctx.codec
                .decode_chunk(&ctx.key, m, i, raw)
                .map(|c| c.into_owned())
        })
        .collect()
}

/// Fetches the stored chunks `start..end` of `m` with one `get_many`; any
/// missing chunk is an error.
async fn fetch_raw(
    ctx: &Ctx<'_>,
    m: &Manifest,
    start: u32,
    end: u32,
) -> Result<Vec<Bytes>, Corrupt> {
    let keys: Vec<String> = (start..end)
        .map(|i| codec::chunk_key(&ctx.key, m.body.write_id, i))
        .collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let found = match ctx.cache.get_many(&refs).await {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(key = %ctx.key, error = %e, "Error fetching data chunks from cache");
            return Err(Corrupt("reading the chunks failed"));
        }
    };
    if found.len() != keys.len() {
        return Err(Corrupt("backend returned the wrong number of chunks"));
    }
    let missing: Vec<&str> = refs
        .iter()
        .zip(&found)
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| *k)
        .collect();
    if !missing.is_empty() {
        tracing::debug!(key = %ctx.key, missing = %missing.join(", "), "Cache miss for key(s)");
        return Err(Corrupt("missing chunk"));
    }
    Ok(found.into_iter().flatten().collect())
}

/// What the fenced write-back of a value's (or a stream's) last item must
/// find under its key (see [`fresh`](super::fresh)).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Over<'a> {
    /// Exactly these bytes (`None`: the key absent).
    pub(crate) bytes: Option<&'a [u8]>,
    /// Or the key absent, though bytes were expected: they were already
    /// past their hard end when read (a coarse-TTL cache such as Memcached
    /// keeps a value up to about two seconds longer), so their going away
    /// is their expiry. A soft invalidation of such a value writes a
    /// tombstone, not a mark (see [`mark_stale`]), so this never lets
    /// through a compute that an invalidation fenced.
    pub(crate) or_absent: bool,
}

impl<'a> Over<'a> {
    /// Over exactly `bytes` (`None`: only if the key is absent).
    pub(crate) fn exactly(bytes: Option<&'a [u8]>) -> Self {
        Self {
            bytes,
            or_absent: false,
        }
    }
}

/// Writes `item` under `ctx.key` as `over` says. Returns whether it was
/// stored; a failure or a refusal is logged.
pub(crate) async fn put_item(ctx: &Ctx<'_>, item: &[u8], over: Over<'_>) -> bool {
    let ttl = ctx.call.ttl();
    let mut stored = ctx.cache.set_if(&ctx.key, over.bytes, item, ttl).await;
    if matches!(stored, Ok(false)) && over.bytes.is_some() && over.or_absent {
        // One more round trip, only when the expired bytes went away.
        stored = ctx.cache.set_if(&ctx.key, None, item, ttl).await;
    }
    match stored {
        Ok(true) => true,
        Ok(false) => {
            tracing::debug!(key = %ctx.key, "the value was invalidated or rewritten during the compute; not storing it");
            false
        }
        Err(e) => {
            tracing::error!(key = %ctx.key, error = %e, "Error setting data in cache for key");
            false
        }
    }
}

/// Stores a single value's plaintext behind its envelope: inline if it
/// fits, else chunks and a manifest, the last item written as `over` says
/// ([`put_item`]).
/// Returns whether it was stored; failures are logged.
pub(crate) async fn store_value(
    ctx: &Ctx<'_>,
    env: &Envelope,
    value: &[u8],
    guard: Option<&mut LockGuard>,
    over: Over<'_>,
) -> bool {
    let mut buf = Vec::with_capacity(super::fresh::ENVELOPE_LEN + value.len());
    env.encode(&mut buf);
    buf.extend_from_slice(value);
    let plain = &buf[..];
    metrics::counter!(super::fresh::metric::BYTES_PLAIN).increment(plain.len() as u64);
    let limit = ctx.key_item_limit();
    let try_inline = plain.len() + INLINE_OVERHEAD <= limit
        || (ctx.codec.compression != codec::Compression::None
            && plain.len() <= limit.saturating_mul(4));
    if try_inline {
        match ctx.codec.encode_inline(&ctx.key, false, plain) {
            Ok(item) if item.len() <= limit => {
                metrics::counter!(super::fresh::metric::BYTES_STORED).increment(item.len() as u64);
                return put_item(ctx, &item, over).await;
            }
            Ok(_) => {}
            Err(c) => {
                tracing::error!(key = %ctx.key, error = %c, "Failed to encode data for cache");
                return false;
            }
        }
    }
    let mut writer = ChunkWriter::new(false);
    let mut guard = guard;
    let segment = ctx.segment();
    let mut rest = plain;
    // Leave the last segment (possibly full) for `finish`.
    while rest.len() > segment {
        let (head, tail) = rest.split_at(segment);
        writer.push(ctx, head);
        rest = tail;
        if writer.pending_bytes() >= BATCH_BYTES && !writer.flush(ctx, guard.as_deref_mut()).await {
            return false;
        }
    }
    writer.push_last(ctx, rest);
    writer.finish(ctx, guard, over).await
}

/// Writes chunks of one write in batches, then the manifest.
pub(crate) struct ChunkWriter {
    stream: bool,
    write_id: u64,
    next_index: u32,
    total_len: u64,
    checksum: Checksum,
    pending: Vec<(String, Vec<u8>)>,
    pending_bytes: usize,
    failed: bool,
    /// When the first chunk was written, to refresh old chunks' TTL.
    first_write: Option<tokio::time::Instant>,
}

impl ChunkWriter {
    pub(crate) fn new(stream: bool) -> Self {
        Self {
            stream,
            write_id: codec::new_write_id(),
            next_index: 0,
            total_len: 0,
            checksum: Checksum::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            failed: false,
            first_write: None,
        }
    }

    pub(crate) fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Chunks written or queued so far.
    pub(crate) fn chunk_count(&self) -> u32 {
        self.next_index
    }

    fn encode(&mut self, ctx: &Ctx<'_>, segment: &[u8], last: bool) {
        if self.failed {
            return;
        }
        let index = self.next_index;
        match ctx
            .codec
            .encode_chunk(&ctx.key, self.stream, self.write_id, index, last, segment)
        {
            Ok(item) => {
                self.checksum.update(segment);
                self.total_len += segment.len() as u64;
                self.pending_bytes += item.len();
                self.pending
                    .push((codec::chunk_key(&ctx.key, self.write_id, index), item));
                match index.checked_add(1) {
                    Some(n) => self.next_index = n,
                    None => self.fail(ctx, "too many chunks"),
                }
            }
            Err(c) => self.fail(ctx, c.0),
        }
    }

    fn fail(&mut self, ctx: &Ctx<'_>, reason: &str) {
        tracing::error!(key = %ctx.key, %reason, "Failed to encode data for cache; it will not be cached");
        self.failed = true;
        self.pending.clear();
    }

    /// Queues a full segment that is not the last.
    pub(crate) fn push(&mut self, ctx: &Ctx<'_>, segment: &[u8]) {
        self.encode(ctx, segment, false);
    }

    /// Queues the last segment (may be empty only if nothing else was
    /// queued, in which case no chunk is written).
    pub(crate) fn push_last(&mut self, ctx: &Ctx<'_>, segment: &[u8]) {
        if segment.is_empty() && self.next_index == 0 {
            return;
        }
        self.encode(ctx, segment, true);
    }

    /// Writes the queued chunks with one `set_many`, then extends the lease.
    /// Returns false (after logging) if the write failed.
    pub(crate) async fn flush(&mut self, ctx: &Ctx<'_>, guard: Option<&mut LockGuard>) -> bool {
        if self.failed {
            return false;
        }
        if self.pending.is_empty() {
            return true;
        }
        let items: Vec<(&str, &[u8])> = self
            .pending
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        if let Err(e) = ctx.cache.set_many(&items, ctx.chunk_ttl()).await {
            let mut keys: Vec<&str> = items.iter().map(|(k, _)| *k).collect();
            keys.sort_unstable();
            tracing::error!(key = %ctx.key, keys = ?keys, error = %e, "Unable to store cached data for keys");
            self.failed = true;
            self.pending.clear();
            return false;
        }
        self.first_write
            .get_or_insert_with(tokio::time::Instant::now);
        self.pending.clear();
        self.pending_bytes = 0;
        if let Some(g) = guard
            && let Err(e) = g.extend(None).await
        {
            tracing::error!(key = %ctx.key, lock = %g.key(), error = %e,
                    "could not extend the memoize lock while writing a large value; the write goes on");
        }
        true
    }

    /// Flushes what is queued and writes the manifest as `over` says
    /// ([`put_item`]). Returns whether it was stored; failures are logged.
    pub(crate) async fn finish(
        mut self,
        ctx: &Ctx<'_>,
        guard: Option<&mut LockGuard>,
        over: Over<'_>,
    ) -> bool {
        if !self.flush(ctx, guard).await {
            return false;
        }
        self.refresh_old_chunks(ctx).await;
        let segment = match u32::try_from(ctx.segment()) {
            Ok(s) => s,
            Err(_) => {
                self.fail(ctx, "segment size too large");
                return false;
            }
        };
        let body = ManifestBody {
            total_len: self.total_len,
            chunk_count: self.next_index,
            segment_size: segment,
            write_id: self.write_id,
            checksum: self.checksum.digest(),
        };
        let item = match ctx.codec.encode_manifest(&ctx.key, self.stream, &body) {
            Ok(item) => item,
            Err(c) => {
                self.fail(ctx, c.0);
                return false;
            }
        };
        let stored = put_item(ctx, &item, over).await;
        if !stored {
            self.delete_chunks(ctx).await;
        }
        stored
    }

    /// Deletes the chunks written so far (their manifest was not stored,
    /// so nothing can reach them), all at once (one round trip where the
    /// backend pipelines); a failure is logged and they expire.
    async fn delete_chunks(&self, ctx: &Ctx<'_>) {
        let keys: Vec<String> = (0..self.next_index)
            .map(|i| codec::chunk_key(&ctx.key, self.write_id, i))
            .collect();
        let deletes = keys.iter().map(|k| ctx.cache.delete(k));
        for (k, r) in keys
            .iter()
            .zip(futures_util::future::join_all(deletes).await)
        {
            if let Err(e) = r {
                tracing::debug!(key = %ctx.key, chunk = %k, error = %e, "could not delete an unreachable chunk; it expires");
            }
        }
    }

    /// A slow writer (a stream) may have written its first chunks long ago:
    /// give them a fresh TTL before the manifest makes them reachable.
    async fn refresh_old_chunks(&self, ctx: &Ctx<'_>) {
        let Some(first) = self.first_write else {
            return;
        };
        let margin = ctx.chunk_ttl() - ctx.call.ttl();
        if first.elapsed() < margin / 2 {
            return;
        }
        for i in 0..self.next_index {
            let k = codec::chunk_key(&ctx.key, self.write_id, i);
            if let Err(e) = ctx.cache.touch(&k, ctx.chunk_ttl()).await {
                tracing::error!(key = %ctx.key, chunk = %k, error = %e, "could not refresh a chunk's expiry");
            }
        }
    }
}
