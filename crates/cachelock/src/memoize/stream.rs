//! [`Cache::stream_with`](crate::Cache::stream_with): the seed's
//! `cache_memoize_iter`, for a sequence of items.
//!
//! The plaintext is a sequence of frames, `varint length || postcard(item)`,
//! cut into chunks as the items come. On a miss each item is handed to the
//! caller as soon as the producer yields it, while full chunks are written
//! as they fill; the manifest is written when the producer ends (a short
//! stream is stored inline). On a hit the items are read back a batch of
//! chunks at a time, never the whole value at once.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::codec::{self, Checksum, Corrupt, Entry, INLINE_OVERHEAD, Manifest};
use super::options::OnLockFailure;
use super::store::{BATCH_BYTES, ChunkWriter, Over, fetch_chunks, log_corrupt, put_item};
use super::{Call, Ctx, LockWait, MemoizeError, release, wait_for_lock};
use crate::handle::Cache;
use crate::key::CacheKey;
use crate::lock::LockGuard;

/// The stream returned by [`Cache::stream_with`] (and the blocking
/// iterator's source).
///
/// Dropping it before the end releases the lock (in the background) and
/// leaves no manifest, so nothing partial is ever read back.
#[must_use = "streams do nothing unless polled"]
pub struct MemoizeStream<T, E> {
    inner: Pin<Box<dyn Stream<Item = Result<T, MemoizeError<E>>> + Send>>,
}

impl<T, E> std::fmt::Debug for MemoizeStream<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoizeStream").finish_non_exhaustive()
    }
}

impl<T: Send + 'static, E: Send + 'static> MemoizeStream<T, E> {
    /// A stream that yields `error` and ends.
    pub(crate) fn failed(error: MemoizeError<E>) -> Self {
        Self {
            inner: Box::pin(futures_util::stream::once(async move { Err(error) })),
        }
    }
}

impl<T, E> Stream for MemoizeStream<T, E> {
    type Item = Result<T, MemoizeError<E>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Memoizes the items of `producer` under `key` (see
/// [`Cache::stream_with`]).
pub(crate) fn stream_with<T, E, S>(
    cache: &Cache,
    key: &CacheKey,
    call: Call,
    producer: S,
) -> MemoizeStream<T, E>
where
    T: Serialize + DeserializeOwned + Send + 'static,
    E: Send + 'static,
    S: Stream<Item = Result<T, E>> + Send + 'static,
{
    let config = &cache.inner.config;
    let state = State {
        full_key: config.keys.build_key(key),
        lock_key: config.lock_key(key, &call),
        cache: cache.clone(),
        call,
        phase: Phase::Start(Box::pin(producer)),
        seen: None,
    };
    let inner = futures_util::stream::unfold(state, |mut st| async move {
        let item = st.step().await?;
        Some((item, st))
    });
    MemoizeStream {
        inner: Box::pin(inner),
    }
}

type Producer<T, E> = Pin<Box<dyn Stream<Item = Result<T, E>> + Send>>;

struct State<T, E> {
    cache: Cache,
    call: Call,
    full_key: String,
    lock_key: String,
    phase: Phase<T, E>,
    /// What the last read that was not a hit found under the value key
    /// (`Some(None)`: absent; `None`: nothing read yet): what the producer's
    /// last item is written over (the fenced write-back).
    seen: Option<Option<Bytes>>,
}

enum Phase<T, E> {
    Start(Producer<T, E>),
    Hit(Box<HitReader>, Option<Producer<T, E>>),
    Fresh(Box<Fresh<T, E>>),
    Done,
}

/// Reads cached frames back.
struct HitReader {
    manifest: Option<Manifest>,
    /// Decoded plaintext not yet consumed, from `pos`.
    buf: Vec<u8>,
    pos: usize,
    /// Chunks fetched but not yet appended to `buf`.
    queued: VecDeque<Vec<u8>>,
    next_chunk: u32,
    checksum: Checksum,
    seen_len: u64,
    yielded: bool,
}

struct Fresh<T, E> {
    producer: Producer<T, E>,
    guard: Option<LockGuard>,
    writer: Option<ChunkWriter>,
    buf: Vec<u8>,
    /// The bytes the last item must find under the value key.
    seen: Option<Bytes>,
}

enum Frame<T> {
    Item(T),
    End,
}

impl HitReader {
    fn inline(plain: Vec<u8>) -> Self {
        Self {
            manifest: None,
            buf: plain,
            pos: 0,
            queued: VecDeque::new(),
            next_chunk: 0,
            checksum: Checksum::new(),
            seen_len: 0,
            yielded: false,
        }
    }

    /// Opens a manifest and fetches the first batch, so that a broken
    /// entry is found before any item is handed out.
    async fn open(ctx: &Ctx<'_>, m: Manifest) -> Result<Self, Corrupt> {
        let mut r = Self {
            manifest: Some(m),
            ..Self::inline(Vec::new())
        };
        r.fetch_batch(ctx).await?;
        Ok(r)
    }

    async fn fetch_batch(&mut self, ctx: &Ctx<'_>) -> Result<(), Corrupt> {
        let Some(m) = self.manifest else {
            return Ok(());
        };
        if self.next_chunk >= m.body.chunk_count {
            return Ok(());
        }
        let per_batch = (BATCH_BYTES / m.body.segment_size.max(1) as usize).clamp(1, 256) as u32;
        let end = self
            .next_chunk
            .saturating_add(per_batch)
            .min(m.body.chunk_count);
        let chunks = fetch_chunks(ctx, &m, self.next_chunk, end).await?;
        for c in &chunks {
            self.checksum.update(c);
            self.seen_len += c.len() as u64;
        }
        self.queued.extend(chunks);
        self.next_chunk = end;
        if self.next_chunk == m.body.chunk_count
            && (self.checksum.digest() != m.body.checksum || self.seen_len != m.body.total_len)
        {
            return Err(Corrupt("stream checksum mismatch"));
        }
        Ok(())
    }

    fn more_chunks(&self) -> bool {
        !self.queued.is_empty()
            || self
                .manifest
                .is_some_and(|m| self.next_chunk < m.body.chunk_count)
    }

    /// The next frame, fetching chunks as needed.
    async fn next_frame<T: DeserializeOwned>(
        &mut self,
        ctx: &Ctx<'_>,
    ) -> Result<Frame<T>, Corrupt> {
        loop {
            let avail = self.buf.get(self.pos..).unwrap_or_default();
            if let Some((len, used)) = codec::take_varint(avail)? {
                let len = usize::try_from(len).map_err(|_| Corrupt("frame too long"))?;
                let body = avail.get(used..).unwrap_or_default();
                if body.len() >= len {
                    let frame = body.get(..len).ok_or(Corrupt("frame out of range"))?;
                    let item = match postcard::take_from_bytes::<T>(frame) {
                        Ok((v, [])) => v,
                        _ => return Err(Corrupt("item does not decode as the requested type")),
                    };
                    self.pos += used + len;
                    return Ok(Frame::Item(item));
                }
                if let Some(m) = self.manifest {
                    // A frame can never be longer than what is left.
                    if len as u64 > m.body.total_len {
                        return Err(Corrupt("frame longer than the stream"));
                    }
                } else {
                    return Err(Corrupt("truncated frame"));
                }
            } else if avail.is_empty() && !self.more_chunks() {
                return Ok(Frame::End);
            }
            // Need more bytes.
            if self.queued.is_empty() {
                if !self.more_chunks() {
                    return Err(Corrupt("stream ends inside a frame"));
                }
                self.fetch_batch(ctx).await?;
            }
            if let Some(chunk) = self.queued.pop_front() {
                if self.pos > 0 {
                    self.buf.drain(..self.pos.min(self.buf.len()));
                    self.pos = 0;
                }
                self.buf.extend_from_slice(&chunk);
            }
        }
    }
}

impl<T, E> State<T, E>
where
    T: Serialize + DeserializeOwned + Send + 'static,
    E: Send + 'static,
{
    async fn step(&mut self) -> Option<Result<T, MemoizeError<E>>> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Done) {
                Phase::Done => return None,
                Phase::Start(producer) => {
                    if let Err(e) = self.start(producer).await {
                        return Some(Err(e));
                    }
                }
                Phase::Hit(mut reader, producer) => {
                    let ctx = Ctx::new(&self.cache.inner, &self.call, self.full_key.clone());
                    match reader.next_frame::<T>(&ctx).await {
                        Ok(Frame::Item(item)) => {
                            reader.yielded = true;
                            self.phase = Phase::Hit(reader, producer);
                            return Some(Ok(item));
                        }
                        Ok(Frame::End) => return None,
                        Err(c) => {
                            log_corrupt(&ctx.key, &c);
                            drop(ctx);
                            match producer {
                                Some(p) if !reader.yielded => {
                                    // Nothing handed out yet: rebuild under the lock.
                                    if let Err(e) = self.miss(p).await {
                                        return Some(Err(e));
                                    }
                                }
                                _ => {
                                    return Some(Err(MemoizeError::Corrupt {
                                        key: self.full_key.clone(),
                                        reason: c.to_string(),
                                    }));
                                }
                            }
                        }
                    }
                }
                Phase::Fresh(mut fresh) => {
                    let next = fresh.producer.next().await;
                    let ctx = Ctx::new(&self.cache.inner, &self.call, self.full_key.clone());
                    match next {
                        Some(Ok(item)) => {
                            fresh.frame_item(&ctx, &item);
                            fresh.write_full_chunks(&ctx).await;
                            drop(ctx);
                            self.phase = Phase::Fresh(fresh);
                            return Some(Ok(item));
                        }
                        Some(Err(e)) => {
                            tracing::debug!(key = %ctx.key, "stream producer failed; nothing is cached");
                            release(fresh.guard.take(), &ctx.key).await;
                            return Some(Err(MemoizeError::Compute(e)));
                        }
                        None => {
                            fresh.finish(&ctx).await;
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// Reads the entry; sets the phase to `Hit`, or goes to `miss`.
    async fn start(&mut self, producer: Producer<T, E>) -> Result<(), MemoizeError<E>> {
        let ctx = Ctx::new(&self.cache.inner, &self.call, self.full_key.clone());
        if !self.call.force_overwrite {
            match read_stream(&ctx).await {
                Ok(reader) => {
                    drop(ctx);
                    self.phase = Phase::Hit(Box::new(reader), Some(producer));
                    return Ok(());
                }
                Err(raw) => {
                    tracing::debug!(key = %ctx.key, "Cache miss for key");
                    self.seen = Some(raw);
                }
            }
        }
        drop(ctx);
        self.miss(producer).await
    }

    /// The miss path: wait for the lock (polling the value), double-check,
    /// then produce.
    async fn miss(&mut self, producer: Producer<T, E>) -> Result<(), MemoizeError<E>> {
        let ctx = Ctx::new(&self.cache.inner, &self.call, self.full_key.clone());
        let mut guard = None;
        if let Some(lock_options) = &self.cache.inner.config.lock {
            let waited = wait_for_lock(&ctx, lock_options, self.lock_key.clone(), &[], |_| async {
                read_stream(&ctx).await.ok()
            })
            .await;
            match waited {
                LockWait::Acquired(g, _) => {
                    if !self.call.force_overwrite {
                        match read_stream(&ctx).await {
                            Ok(reader) => {
                                release(Some(g), &ctx.key).await;
                                drop(ctx);
                                // Fall back no further: a second corrupt read ends the stream.
                                self.phase = Phase::Hit(Box::new(reader), None);
                                return Ok(());
                            }
                            Err(raw) => self.seen = Some(raw),
                        }
                    }
                    guard = Some(g);
                }
                LockWait::Value(reader) => {
                    drop(ctx);
                    self.phase = Phase::Hit(Box::new(reader), None);
                    return Ok(());
                }
                LockWait::Without => {}
                // Streams keep no stale copy: serving stale means going on
                // without the lock.
                LockWait::Fail(_) if self.call.on_lock_failure == OnLockFailure::ServeStale => {}
                LockWait::Fail(e) => return Err(MemoizeError::Lock(e)),
            }
        }
        // A forced overwrite, or a rebuild after a corrupt hit, has read
        // nothing it may write over yet.
        let seen = match self.seen.take() {
            Some(raw) => raw,
            None => read_raw(&ctx).await,
        };
        drop(ctx);
        self.phase = Phase::Fresh(Box::new(Fresh {
            producer,
            guard,
            writer: Some(ChunkWriter::new(true)),
            buf: Vec::new(),
            seen,
        }));
        Ok(())
    }
}

/// The item under the value key as stored (`None`: absent, or the read
/// failed, logged).
async fn read_raw(ctx: &Ctx<'_>) -> Option<Bytes> {
    ctx.cache.get(&ctx.key).await.unwrap_or_else(|e| {
        tracing::error!(key = %ctx.key, error = %e, "Failed to fetch large or iterable data entry count from cache");
        None
    })
}

/// Reads a cached stream; a miss or an unusable entry (logged) is the
/// raw bytes found (`None`: absent, or the read failed).
async fn read_stream(ctx: &Ctx<'_>) -> Result<HitReader, Option<Bytes>> {
    let Some(raw) = read_raw(ctx).await else {
        return Err(None);
    };
    match decode_stream(ctx, &raw).await {
        Some(reader) => Ok(reader),
        None => Err(Some(raw)),
    }
}

/// Opens a stored stream item: `None` for a miss or an unusable entry
/// (logged).
async fn decode_stream(ctx: &Ctx<'_>, raw: &[u8]) -> Option<HitReader> {
    // A stream has no stale window: a stale mark makes it a miss.
    let (marked, item) = codec::strip_stale_mark(raw);
    if marked {
        return None;
    }
    let result = match ctx
        .codec
        .decode_entry(&ctx.key, item, ctx.cache.max_value_size())
    {
        Ok(Entry::Gone) => return None,
        Ok(Entry::Inline {
            stream: true,
            plain,
            ..
        }) => Ok(HitReader::inline(plain.into_owned())),
        Ok(Entry::Manifest(m)) if m.stream => HitReader::open(ctx, m).await,
        Ok(_) => Err(Corrupt(
            "a single value is stored under this key, not a stream",
        )),
        Err(c) => Err(c),
    };
    match result {
        Ok(r) => Some(r),
        Err(c) => {
            log_corrupt(&ctx.key, &c);
            None
        }
    }
}

impl<T: Serialize, E> Fresh<T, E> {
    /// Frames `item` into the buffer (sync, so `T` need not be `Sync`).
    fn frame_item(&mut self, ctx: &Ctx<'_>, item: &T) {
        if self.writer.is_none() {
            return;
        }
        match postcard::to_allocvec(item) {
            Ok(bytes) => {
                codec::put_varint(&mut self.buf, bytes.len() as u64);
                self.buf.extend_from_slice(&bytes);
            }
            Err(e) => {
                tracing::error!(key = %ctx.key, error = %e,
                    "Failed to generate large or iterable cache data; newly generated data will be returned but not cached");
                self.stop_caching();
            }
        }
    }

    /// Writes any full chunks in the buffer.
    async fn write_full_chunks(&mut self, ctx: &Ctx<'_>) {
        let Some(writer) = self.writer.as_mut() else {
            return;
        };
        let segment = ctx.segment();
        if self.buf.len() <= segment {
            return;
        }
        // Keep the remainder (even a full segment) for the end: the last
        // chunk is marked as such.
        let full = (self.buf.len() - 1) / segment;
        for i in 0..full {
            writer.push(ctx, &self.buf[i * segment..(i + 1) * segment]);
        }
        self.buf.drain(..full * segment);
        if !writer.flush(ctx, self.guard.as_mut()).await {
            self.stop_caching();
        }
    }

    fn stop_caching(&mut self) {
        self.writer = None;
        self.buf = Vec::new();
    }

    /// The producer ended: write the rest and the manifest (or an inline
    /// item), then release the lock.
    async fn finish(mut self, ctx: &Ctx<'_>) {
        if let Some(mut writer) = self.writer.take() {
            if writer.chunk_count() == 0 && self.buf.len() + INLINE_OVERHEAD <= ctx.key_item_limit()
            {
                match ctx.codec.encode_inline(&ctx.key, true, &self.buf) {
                    Ok(item) => {
                        put_item(ctx, &item, Over::exactly(self.seen.as_deref())).await;
                    }
                    Err(c) => {
                        tracing::error!(key = %ctx.key, error = %c, "Failed to encode data for cache");
                    }
                }
            } else {
                writer.push_last(ctx, &self.buf);
                // Fenced, as a value's write-back (see `fresh`); a stream
                // has no envelope, so no read of it is known to be expired.
                writer
                    .finish(
                        ctx,
                        self.guard.as_mut(),
                        Over::exactly(self.seen.as_deref()),
                    )
                    .await;
            }
        }
        release(self.guard.take(), &ctx.key).await;
    }
}
