//! The stored format of memoized values.
//!
//! Every item memoize writes starts with a 4-byte header (2 magic bytes,
//! the format version, the item kind) and ends with the XXH3-64 checksum of
//! all the bytes before it, so a corrupt, truncated or foreign value is
//! recognised before anything is decoded.
//!
//! ```text
//! inline    : C1 0C 02 01 | flags | plain_len u32 | body                 | xxh3 u64
//! manifest  : C1 0C 02 02 | flags | body (ManifestBody, postcard)        | xxh3 u64
//! chunk     : C1 0C 02 03 | flags | write_id u64 | index u32 | plain_len u32 | body | xxh3 u64
//! tombstone : C1 0C 02 04 | id u64                                       | xxh3 u64
//! stale     : 5E | id u64 | an inline item or a manifest, as stored
//! ```
//!
//! * `flags`: bit 0 the body is LZ4-compressed, bit 1 it is encrypted,
//!   bit 2 the content is an item stream (not a single value), bit 3 the
//!   chunk is the last one of its write.
//! * An encrypted body is `nonce (12) || ChaCha20-Poly1305 ciphertext + tag`;
//!   the associated data is everything before the body plus the value's
//!   cache key, so a body cannot be moved to another key, chunk index or
//!   write.
//! * A *tombstone* is what [`Cache::invalidate`](crate::Cache::invalidate)
//!   leaves under a value's key: a miss for readers. Its random id makes
//!   every tombstone differ from every other, so a writer that expects the
//!   bytes it read before its compute (fenced write-back, see
//!   [`fresh`](super::fresh)) never mistakes a later one for its own.
//! * A *stale mark* is what
//!   [`Cache::invalidate_soft`](crate::Cache::invalidate_soft) wraps around
//!   the stored item: one byte that no item starts with, a random id (for
//!   the same reason), then the item's bytes untouched, so its checksum and
//!   encryption need no change. Readers strip it and serve the value as
//!   stale.
//! * Items of format version 1 (before tombstones and stale marks; their
//!   envelope also carried a version and a generation) read as a clean
//!   miss, as tombstones do, and are rebuilt.
//! * The *plaintext* is postcard of the value, or for a stream a sequence of
//!   frames `varint length || postcard(item)`. It is cut into segments of
//!   `segment_size` bytes (a manifest field); each segment is compressed and
//!   encrypted on its own and stored as one chunk.

use std::borrow::Cow;
use std::sync::Arc;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// The current format version. Readers treat the previous one as a miss
/// and any other as unreadable (a logged miss).
pub const FORMAT_VERSION: u8 = 2;

/// The format before tombstones and stale marks.
const PREVIOUS_FORMAT_VERSION: u8 = 1;

const MAGIC: [u8; 2] = [0xC1, 0x0C];
const KIND_INLINE: u8 = 1;
const KIND_MANIFEST: u8 = 2;
const KIND_CHUNK: u8 = 3;
const KIND_TOMBSTONE: u8 = 4;

/// The first byte of a stale mark (no item starts with it).
const STALE_MARK: u8 = 0x5E;

/// Bytes a stale mark adds in front of an item. Items under a value's key
/// are kept this much under the item limit, so marking one never makes it
/// too large to store.
pub(crate) const STALE_MARK_LEN: usize = 1 + 8;

const TOMBSTONE_LEN: usize = 4 + 8 + CHECKSUM_LEN;

const FLAG_LZ4: u8 = 1;
const FLAG_ENCRYPTED: u8 = 1 << 1;
const FLAG_STREAM: u8 = 1 << 2;
const FLAG_LAST: u8 = 1 << 3;
/// A value's plaintext starts with a freshness envelope (set on every value
/// written since; readers from before refuse the flag, a clean miss).
const FLAG_ENVELOPE: u8 = 1 << 4;
const KNOWN_FLAGS: u8 = FLAG_LZ4 | FLAG_ENCRYPTED | FLAG_STREAM | FLAG_LAST | FLAG_ENVELOPE;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const CHECKSUM_LEN: usize = 8;
const INLINE_HEADER_LEN: usize = 4 + 1 + 4;
const CHUNK_HEADER_LEN: usize = 4 + 1 + 8 + 4 + 4;

/// Bytes a chunk adds to its segment of plaintext at most (header, nonce,
/// tag, checksum): a chunk of `chunk_size` bytes carries
/// `chunk_size - CHUNK_OVERHEAD` bytes of the encoded value.
pub const CHUNK_OVERHEAD: usize = 64;

/// Bytes an inline item adds to the encoded value at most.
pub const INLINE_OVERHEAD: usize = INLINE_HEADER_LEN + NONCE_LEN + TAG_LEN + CHECKSUM_LEN;

/// Values shorter than this are never compressed: LZ4 gains little on them
/// and decompressing would only slow the hit path.
const MIN_COMPRESS_LEN: usize = 256;

/// The smallest segment a reader accepts in a manifest.
pub(crate) const MIN_SEGMENT: usize = 64;

/// How values are compressed before they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Compression {
    /// Stored as encoded.
    None,
    /// LZ4 block compression (lz4_flex), per chunk, kept only when it saves
    /// at least an eighth. Values under 256 encoded bytes are not compressed.
    #[default]
    Lz4,
}

impl From<bool> for Compression {
    fn from(on: bool) -> Self {
        if on {
            Compression::Lz4
        } else {
            Compression::None
        }
    }
}

/// A ChaCha20-Poly1305 key derived from the caller's encryption key.
pub(crate) struct Cipher {
    aead: ChaCha20Poly1305,
}

impl Cipher {
    /// Derives the cipher key as HMAC-SHA256(secret, label), so any length
    /// of secret works and the raw secret (also used for key names) is not
    /// the cipher key itself.
    pub(crate) fn new(secret: &[u8]) -> Self {
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"cachelock memoize encryption v1");
        let derived: [u8; 32] = mac.finalize().into_bytes().into();
        Self {
            aead: ChaCha20Poly1305::new(&Key::from(derived)),
        }
    }

    fn seal(&self, aad: &[&[u8]], plain: &[u8], out: &mut Vec<u8>) -> Result<(), Corrupt> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::rng().random();
        let aad = join(aad);
        let sealed = self
            .aead
            .encrypt(
                &Nonce::from(nonce_bytes),
                Payload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .map_err(|_| Corrupt("encryption failed"))?;
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&sealed);
        Ok(())
    }

    fn open(&self, aad: &[&[u8]], body: &[u8]) -> Result<Vec<u8>, Corrupt> {
        if body.len() < NONCE_LEN + TAG_LEN {
            return Err(Corrupt("encrypted body too short"));
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        let mut nonce_bytes = [0u8; NONCE_LEN];
        nonce_bytes.copy_from_slice(nonce);
        let aad = join(aad);
        self.aead
            .decrypt(
                &Nonce::from(nonce_bytes),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| Corrupt("decryption failed (wrong key or tampered data)"))
    }
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(<redacted>)")
    }
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

/// Why a stored item was not accepted. Logged; the value is then a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Corrupt(pub(crate) &'static str);

impl std::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// How one memoize call writes and reads values.
#[derive(Debug, Clone)]
pub(crate) struct Codec {
    pub(crate) compression: Compression,
    pub(crate) cipher: Option<Arc<Cipher>>,
}

/// The manifest's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ManifestBody {
    /// Length of the whole plaintext.
    pub(crate) total_len: u64,
    /// Number of chunks.
    pub(crate) chunk_count: u32,
    /// Plaintext bytes per chunk (the last may hold fewer).
    pub(crate) segment_size: u32,
    /// Random id of this write; part of every chunk key.
    pub(crate) write_id: u64,
    /// XXH3-64 of the whole plaintext.
    pub(crate) checksum: u64,
}

/// A decoded manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub(crate) body: ManifestBody,
    pub(crate) stream: bool,
    /// The joined plaintext starts with an envelope.
    pub(crate) enveloped: bool,
}

impl Manifest {
    /// Checks the fields against each other and the backend's limit, so a
    /// hostile manifest cannot make a reader allocate or fetch much.
    fn validate(&self, max_value_size: usize) -> Result<(), Corrupt> {
        let b = &self.body;
        let seg = b.segment_size as usize;
        if seg < MIN_SEGMENT || seg > max_value_size {
            return Err(Corrupt("manifest segment size out of range"));
        }
        let expected = b.total_len.div_ceil(u64::from(b.segment_size));
        if expected != u64::from(b.chunk_count) {
            return Err(Corrupt("manifest chunk count does not match its length"));
        }
        Ok(())
    }

    /// Plaintext length of chunk `index`.
    pub(crate) fn segment_len(&self, index: u32) -> usize {
        let seg = u64::from(self.body.segment_size);
        let start = u64::from(index) * seg;
        let len = self.body.total_len.saturating_sub(start).min(seg);
        usize::try_from(len).unwrap_or(0)
    }
}

/// A new tombstone (see the [module docs](self)).
pub(crate) fn tombstone() -> Vec<u8> {
    let mut out = Vec::with_capacity(TOMBSTONE_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(KIND_TOMBSTONE);
    out.extend_from_slice(&new_write_id().to_le_bytes());
    finish(out)
}

/// Whether `raw` is a tombstone.
pub(crate) fn is_tombstone(raw: &[u8]) -> bool {
    raw.len() == TOMBSTONE_LEN && checked_frame(raw, KIND_TOMBSTONE).is_ok()
}

/// `raw` (an item as stored, perhaps marked already) with a new stale mark.
pub(crate) fn mark_stale(raw: &[u8]) -> Vec<u8> {
    let (_, item) = strip_stale_mark(raw);
    let mut out = Vec::with_capacity(STALE_MARK_LEN + item.len());
    out.push(STALE_MARK);
    out.extend_from_slice(&new_write_id().to_le_bytes());
    out.extend_from_slice(item);
    out
}

/// Whether `raw` carries a stale mark, and the item inside.
pub(crate) fn strip_stale_mark(raw: &[u8]) -> (bool, &[u8]) {
    match raw.split_first() {
        Some((&STALE_MARK, rest)) if rest.len() >= 8 => (true, &rest[8..]),
        _ => (false, raw),
    }
}

/// A decoded item found under a value's key.
#[derive(Debug)]
pub(crate) enum Entry<'a> {
    /// Nothing to read: a tombstone, or an item of an older format.
    Gone,
    /// The whole plaintext, stored inline (starting with an envelope if
    /// `enveloped`).
    Inline {
        stream: bool,
        enveloped: bool,
        plain: Cow<'a, [u8]>,
    },
    /// A manifest: the plaintext is in chunks.
    Manifest(Manifest),
}

fn checked_frame(raw: &[u8], kind: u8) -> Result<&[u8], Corrupt> {
    if raw.len() < 4 + 1 + CHECKSUM_LEN {
        return Err(Corrupt("too short"));
    }
    if raw[..2] != MAGIC {
        return Err(Corrupt("not a cachelock value (bad magic)"));
    }
    if raw[2] != FORMAT_VERSION {
        return Err(Corrupt("unknown format version"));
    }
    if raw[3] != kind {
        return Err(Corrupt("unexpected item kind"));
    }
    let (content, sum) = raw.split_at(raw.len() - CHECKSUM_LEN);
    let mut sum_bytes = [0u8; CHECKSUM_LEN];
    sum_bytes.copy_from_slice(sum);
    if xxh3_64(content) != u64::from_le_bytes(sum_bytes) {
        return Err(Corrupt("checksum mismatch"));
    }
    Ok(content)
}

fn finish(mut out: Vec<u8>) -> Vec<u8> {
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, Corrupt> {
    let s = b.get(at..at + 4).ok_or(Corrupt("truncated header"))?;
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    Ok(u32::from_le_bytes(a))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, Corrupt> {
    let s = b.get(at..at + 8).ok_or(Corrupt("truncated header"))?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

/// Compresses `plain` if that is on and worth it. Returns the body and
/// whether it is compressed.
fn maybe_compress<'a>(
    compression: Compression,
    plain: &'a [u8],
) -> (std::borrow::Cow<'a, [u8]>, bool) {
    if compression == Compression::Lz4 && plain.len() >= MIN_COMPRESS_LEN {
        let c = lz4_flex::block::compress(plain);
        if c.len() <= plain.len() - plain.len() / 8 {
            return (c.into(), true);
        }
    }
    (plain.into(), false)
}

fn decompress(body: &[u8], plain_len: usize) -> Result<Vec<u8>, Corrupt> {
    // LZ4 expands at most ~255x; a claim beyond that is a lie, and refusing
    // it bounds the allocation by the bytes actually stored.
    if plain_len > body.len().saturating_mul(255).saturating_add(16) {
        return Err(Corrupt("compressed length claim is impossible"));
    }
    let mut out = vec![0u8; plain_len];
    match lz4_flex::block::decompress_into(body, &mut out) {
        Ok(n) if n == plain_len => Ok(out),
        _ => Err(Corrupt("LZ4 data is invalid")),
    }
}

impl Codec {
    fn flags(&self, compressed: bool, stream: bool) -> u8 {
        let mut f = 0;
        if compressed {
            f |= FLAG_LZ4;
        }
        if self.cipher.is_some() {
            f |= FLAG_ENCRYPTED;
        }
        if stream {
            f |= FLAG_STREAM;
        }
        f
    }

    /// The flags of a value's inline item or manifest: values carry an
    /// envelope, streams do not.
    fn value_flags(&self, compressed: bool, stream: bool) -> u8 {
        let f = self.flags(compressed, stream);
        if stream { f } else { f | FLAG_ENVELOPE }
    }

    /// Builds one stored item: magic, version, `kind`, `flags`, the
    /// kind's `fields`, then `body` (sealed when encrypting: the whole
    /// header and the cache key are the associated data), then the checksum.
    fn item(
        &self,
        key: &str,
        kind: u8,
        flags: u8,
        fields: &[&[u8]],
        body: &[u8],
        overhead: usize,
    ) -> Result<Vec<u8>, Corrupt> {
        let mut out = Vec::with_capacity(body.len() + overhead);
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        out.push(kind);
        out.push(flags);
        for f in fields {
            out.extend_from_slice(f);
        }
        match &self.cipher {
            Some(c) => {
                let header = out.clone();
                c.seal(&[&header, key.as_bytes()], body, &mut out)?;
            }
            None => out.extend_from_slice(body),
        }
        Ok(finish(out))
    }

    /// Encodes `plain` as one inline item for `key`.
    pub(crate) fn encode_inline(
        &self,
        key: &str,
        stream: bool,
        plain: &[u8],
    ) -> Result<Vec<u8>, Corrupt> {
        let plain_len = u32::try_from(plain.len()).map_err(|_| Corrupt("value too long"))?;
        let (body, compressed) = maybe_compress(self.compression, plain);
        let flags = self.value_flags(compressed, stream);
        let fields: [&[u8]; 1] = [&plain_len.to_le_bytes()];
        self.item(key, KIND_INLINE, flags, &fields, &body, INLINE_OVERHEAD)
    }

    /// Encodes a manifest for `key`.
    pub(crate) fn encode_manifest(
        &self,
        key: &str,
        stream: bool,
        body: &ManifestBody,
    ) -> Result<Vec<u8>, Corrupt> {
        let fields = postcard::to_allocvec(body).map_err(|_| Corrupt("manifest encoding"))?;
        let flags = self.value_flags(false, stream);
        self.item(key, KIND_MANIFEST, flags, &[], &fields, INLINE_OVERHEAD)
    }

    /// Encodes one chunk (segment `index` of write `write_id`) for `key`.
    pub(crate) fn encode_chunk(
        &self,
        key: &str,
        stream: bool,
        write_id: u64,
        index: u32,
        last: bool,
        plain: &[u8],
    ) -> Result<Vec<u8>, Corrupt> {
        let plain_len = u32::try_from(plain.len()).map_err(|_| Corrupt("segment too long"))?;
        let (body, compressed) = maybe_compress(self.compression, plain);
        let mut flags = self.flags(compressed, stream);
        if last {
            flags |= FLAG_LAST;
        }
        let fields: [&[u8]; 3] = [
            &write_id.to_le_bytes(),
            &index.to_le_bytes(),
            &plain_len.to_le_bytes(),
        ];
        self.item(key, KIND_CHUNK, flags, &fields, &body, CHUNK_OVERHEAD)
    }

    /// Checks the flags of an item against this codec: an encrypted item
    /// needs our key, and with a key we accept only encrypted items.
    fn check_flags(&self, flags: u8) -> Result<(), Corrupt> {
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Corrupt("unknown flags"));
        }
        match (flags & FLAG_ENCRYPTED != 0, self.cipher.is_some()) {
            (true, false) => Err(Corrupt("value is encrypted and no encryption key is set")),
            (false, true) => Err(Corrupt(
                "value is not encrypted but an encryption key is set",
            )),
            _ => Ok(()),
        }
    }

    fn open_body<'a>(
        &self,
        header: &[u8],
        key: &str,
        body: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, Corrupt> {
        match &self.cipher {
            Some(c) => c.open(&[header, key.as_bytes()], body).map(Cow::Owned),
            None => Ok(Cow::Borrowed(body)),
        }
    }

    /// Decodes what was found under a value's key.
    pub(crate) fn decode_entry<'a>(
        &self,
        key: &str,
        raw: &'a [u8],
        max_value_size: usize,
    ) -> Result<Entry<'a>, Corrupt> {
        if raw.len() < 4 {
            return Err(Corrupt("too short"));
        }
        if raw[..2] == MAGIC && raw[2] == PREVIOUS_FORMAT_VERSION {
            return Ok(Entry::Gone);
        }
        match raw[3] {
            KIND_TOMBSTONE => checked_frame(raw, KIND_TOMBSTONE).map(|_| Entry::Gone),
            KIND_INLINE => {
                let content = checked_frame(raw, KIND_INLINE)?;
                if content.len() < INLINE_HEADER_LEN {
                    return Err(Corrupt("truncated header"));
                }
                let flags = content[4];
                self.check_flags(flags)?;
                if flags & FLAG_LAST != 0
                    || (flags & FLAG_STREAM != 0 && flags & FLAG_ENVELOPE != 0)
                {
                    return Err(Corrupt("unexpected flags"));
                }
                let plain_len = u32_at(content, 5)? as usize;
                let (header, body) = content.split_at(INLINE_HEADER_LEN);
                let body = self.open_body(header, key, body)?;
                let plain = if flags & FLAG_LZ4 != 0 {
                    if plain_len > max_value_size.saturating_mul(256) {
                        return Err(Corrupt("inline length out of range"));
                    }
                    Cow::Owned(decompress(&body, plain_len)?)
                } else if body.len() == plain_len {
                    body
                } else {
                    return Err(Corrupt("inline length mismatch"));
                };
                Ok(Entry::Inline {
                    stream: flags & FLAG_STREAM != 0,
                    enveloped: flags & FLAG_ENVELOPE != 0,
                    plain,
                })
            }
            KIND_MANIFEST => {
                let content = checked_frame(raw, KIND_MANIFEST)?;
                let flags = content[4];
                self.check_flags(flags)?;
                if flags & (FLAG_LAST | FLAG_LZ4) != 0
                    || (flags & FLAG_STREAM != 0 && flags & FLAG_ENVELOPE != 0)
                {
                    return Err(Corrupt("unexpected flags"));
                }
                let (header, body) = content.split_at(5);
                let fields = self.open_body(header, key, body)?;
                let body: ManifestBody = match postcard::take_from_bytes(&fields) {
                    Ok((b, [])) => b,
                    _ => return Err(Corrupt("manifest fields do not decode")),
                };
                let m = Manifest {
                    body,
                    stream: flags & FLAG_STREAM != 0,
                    enveloped: flags & FLAG_ENVELOPE != 0,
                };
                m.validate(max_value_size)?;
                Ok(Entry::Manifest(m))
            }
            _ => Err(Corrupt("not a cachelock value (unknown kind)")),
        }
    }

    /// Decodes chunk `index` of the write described by `m`.
    pub(crate) fn decode_chunk<'a>(
        &self,
        key: &str,
        m: &Manifest,
        index: u32,
        raw: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, Corrupt> {
        let content = checked_frame(raw, KIND_CHUNK)?;
        if content.len() < CHUNK_HEADER_LEN {
            return Err(Corrupt("truncated chunk header"));
        }
        let flags = content[4];
        self.check_flags(flags)?;
        if (flags & FLAG_STREAM != 0) != m.stream {
            return Err(Corrupt("chunk content kind differs from the manifest"));
        }
        let last = index.checked_add(1) == Some(m.body.chunk_count);
        if (flags & FLAG_LAST != 0) != last {
            return Err(Corrupt("chunk last flag differs from the manifest"));
        }
        if u64_at(content, 5)? != m.body.write_id {
            return Err(Corrupt("chunk belongs to another write"));
        }
        if u32_at(content, 13)? != index {
            return Err(Corrupt("chunk index mismatch"));
        }
        let plain_len = u32_at(content, 17)? as usize;
        if plain_len != m.segment_len(index) {
            return Err(Corrupt("chunk length differs from the manifest"));
        }
        let (header, body) = content.split_at(CHUNK_HEADER_LEN);
        let body = self.open_body(header, key, body)?;
        if flags & FLAG_LZ4 != 0 {
            decompress(&body, plain_len).map(Cow::Owned)
        } else if body.len() == plain_len {
            Ok(body)
        } else {
            Err(Corrupt("chunk length mismatch"))
        }
    }
}

/// A fresh random write id.
pub(crate) fn new_write_id() -> u64 {
    rand::rng().random()
}

/// The key of chunk `index` of write `write_id` of the value under `key`.
/// At most 230 bytes and Memcached-safe when `key` is.
pub(crate) fn chunk_key(key: &str, write_id: u64, index: u32) -> String {
    if key.len() <= CHUNK_KEY_KEEP {
        format!("{key}:#{write_id:016x}:{index}")
    } else {
        format!("{}:#{write_id:016x}:{index}", long_key_stem(key))
    }
}

/// Keys up to this long are kept whole in chunk and side keys.
pub(crate) const CHUNK_KEY_KEEP: usize = 200;

/// The stem of a derived key for a key longer than [`CHUNK_KEY_KEEP`]: its
/// first 135 bytes (cut back to a character boundary), then the hex
/// SHA-256 of the whole key.
pub(crate) fn long_key_stem(key: &str) -> String {
    let mut cut = CHUNK_KEY_KEEP - 65;
    while !key.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    format!("{}{digest}", &key[..cut])
}

/// An incremental XXH3-64 over the plaintext, for the manifest checksum.
pub(crate) struct Checksum(Box<Xxh3>);

impl Checksum {
    pub(crate) fn new() -> Self {
        Self(Box::new(Xxh3::new()))
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub(crate) fn digest(&self) -> u64 {
        self.0.digest()
    }
}

/// Appends the LEB128 varint of `n`.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Reads a LEB128 varint from the front of `b`: `Ok(None)` if more bytes
/// are needed, an error if it is malformed.
pub(crate) fn take_varint(b: &[u8]) -> Result<Option<(u64, usize)>, Corrupt> {
    let mut n: u64 = 0;
    for (i, byte) in b.iter().enumerate() {
        if i >= 10 {
            return Err(Corrupt("frame length varint too long"));
        }
        let bits = u64::from(byte & 0x7f);
        // The tenth byte holds bit 63 only: more would be shifted out.
        if i == 9 && bits > 1 {
            return Err(Corrupt("frame length overflow"));
        }
        n |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((n, i + 1)));
        }
    }
    if b.len() >= 10 {
        return Err(Corrupt("frame length varint too long"));
    }
    Ok(None)
}

/// Decodes stored items the way a memoize read does: `entry` as found under
/// the value's key `key`, then, for a manifest, `chunks` as its chunks 0, 1,
/// ... (all of them must be given), checking the whole-value checksum and
/// length; then walks the plaintext as stream frames (`varint length ||
/// bytes`). Returns the plaintext and the number of whole frames, or why
/// the items were refused. A stale mark is stripped first; a tombstone (or
/// an item of an older format) gives no plaintext.
///
/// For the `memoize_decode` fuzz target only; not part of the API.
#[doc(hidden)]
pub fn fuzz_decode(
    key: &str,
    entry: &[u8],
    chunks: &[&[u8]],
    encryption_key: Option<&[u8]>,
    max_value_size: usize,
) -> Result<(Vec<u8>, usize), &'static str> {
    let codec = Codec {
        compression: Compression::Lz4,
        cipher: encryption_key.map(|k| Arc::new(Cipher::new(k))),
    };
    let (_, entry) = strip_stale_mark(entry);
    let decoded = codec
        .decode_entry(key, entry, max_value_size)
        .map_err(|c| c.0)?;
    let enveloped = match &decoded {
        Entry::Gone => return Ok((Vec::new(), 0)),
        Entry::Inline { enveloped, .. } => *enveloped,
        Entry::Manifest(m) => m.enveloped,
    };
    let plain = match decoded {
        Entry::Gone => Vec::new(),
        Entry::Inline { plain, .. } => plain.into_owned(),
        Entry::Manifest(m) => {
            let count = usize::try_from(m.body.chunk_count).map_err(|_| "too many chunks")?;
            if count > chunks.len() {
                return Err("missing chunk");
            }
            let mut out = Vec::new();
            let mut sum = Checksum::new();
            for (i, raw) in (0..m.body.chunk_count).zip(chunks) {
                let plain = codec.decode_chunk(key, &m, i, raw).map_err(|c| c.0)?;
                sum.update(&plain);
                out.extend_from_slice(&plain);
            }
            if sum.digest() != m.body.checksum || out.len() as u64 != m.body.total_len {
                return Err("value checksum mismatch");
            }
            out
        }
    };
    // The value's own plaintext follows its freshness envelope.
    let plain = if enveloped {
        match super::fresh::Envelope::decode(&plain) {
            Some((_, body)) => body.to_vec(),
            None => return Err("bad freshness envelope"),
        }
    } else {
        plain
    };
    let mut frames = 0;
    let mut rest = plain.as_slice();
    while let Ok(Some((len, used))) = take_varint(rest) {
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| used.checked_add(len))
            .filter(|end| *end <= rest.len());
        let Some(end) = end else { break };
        rest = rest.get(end..).unwrap_or_default();
        frames += 1;
    }
    Ok((plain, frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(comp: bool, key: Option<&[u8]>) -> Codec {
        Codec {
            compression: comp.into(),
            cipher: key.map(|k| Arc::new(Cipher::new(k))),
        }
    }

    #[test]
    fn inline_roundtrip_all_codecs() {
        let plain: Vec<u8> = b"hello world ".repeat(100);
        for comp in [false, true] {
            for key in [None, Some(&b"k"[..])] {
                let c = codec(comp, key);
                let raw = c.encode_inline("key", false, &plain).unwrap();
                match c.decode_entry("key", &raw, 1 << 20).unwrap() {
                    Entry::Inline {
                        stream, plain: p, ..
                    } => {
                        assert!(!stream);
                        assert_eq!(&*p, &plain[..]);
                    }
                    e => panic!("{e:?}"),
                }
                if comp {
                    assert!(raw.len() < plain.len() / 2, "compressed");
                }
                // Another key cannot read an encrypted value moved to it.
                if key.is_some() {
                    assert!(c.decode_entry("other", &raw, 1 << 20).is_err());
                    assert!(
                        codec(comp, Some(b"k2"))
                            .decode_entry("key", &raw, 1 << 20)
                            .is_err()
                    );
                    assert!(
                        codec(comp, None)
                            .decode_entry("key", &raw, 1 << 20)
                            .is_err()
                    );
                }
            }
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let c = codec(true, None);
        let raw = c.encode_inline("key", false, &[7u8; 300]).unwrap();
        for i in 0..raw.len() * 8 {
            let mut bad = raw.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(c.decode_entry("key", &bad, 1 << 20).is_err(), "bit {i}");
        }
        for n in 0..raw.len() {
            assert!(
                c.decode_entry("key", &raw[..n], 1 << 20).is_err(),
                "len {n}"
            );
        }
    }

    #[test]
    fn hostile_manifest_is_refused() {
        let c = codec(false, None);
        let huge = ManifestBody {
            total_len: 1_000_000_000 * 1024,
            chunk_count: 1_000_000_000,
            segment_size: 1024,
            write_id: 1,
            checksum: 0,
        };
        // Valid shape but counts inconsistent.
        let bad = ManifestBody {
            chunk_count: 3,
            ..huge
        };
        let raw = c.encode_manifest("k", false, &bad).unwrap();
        assert!(c.decode_entry("k", &raw, 1 << 20).is_err());
        let big_seg = ManifestBody {
            total_len: 10,
            chunk_count: 1,
            segment_size: u32::MAX,
            write_id: 1,
            checksum: 0,
        };
        let raw = c.encode_manifest("k", false, &big_seg).unwrap();
        assert!(c.decode_entry("k", &raw, 1 << 20).is_err());
    }

    #[test]
    fn decompress_refuses_impossible_lengths() {
        assert!(decompress(&[0u8; 4], 1 << 30).is_err());
        assert!(decompress(&[0xff; 64], 1000).is_err());
    }

    #[test]
    fn varints() {
        for n in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut v = Vec::new();
            put_varint(&mut v, n);
            assert_eq!(take_varint(&v).unwrap(), Some((n, v.len())));
            assert_eq!(take_varint(&v[..v.len() - 1]).unwrap(), None);
        }
        assert!(take_varint(&[0xff; 11]).is_err());
        // A tenth byte over 1 would overflow 64 bits: refused, not truncated.
        let mut over = vec![0xff; 9];
        over.push(0x7f);
        assert!(take_varint(&over).is_err());
        over[9] = 0x02;
        assert!(take_varint(&over).is_err());
    }

    #[test]
    fn chunk_keys_are_bounded_and_distinct() {
        let k = chunk_key("ns:key", 0xab, 3);
        assert_eq!(k, "ns:key:#00000000000000ab:3");
        let long = "é".repeat(120);
        let k = chunk_key(&long, u64::MAX, u32::MAX);
        assert!(k.len() <= 230, "{}", k.len());
        assert_ne!(chunk_key("a", 1, 0), chunk_key("a", 2, 0));
    }

    #[test]
    fn tombstones_and_stale_marks() {
        let c = codec(true, None);
        let t = tombstone();
        assert!(is_tombstone(&t));
        assert_ne!(t, tombstone(), "every tombstone differs");
        assert!(matches!(c.decode_entry("k", &t, 1 << 20), Ok(Entry::Gone)));
        let item = c.encode_inline("k", false, b"plain").unwrap();
        assert!(!is_tombstone(&item));
        assert_eq!(strip_stale_mark(&item), (false, &item[..]));
        let marked = mark_stale(&item);
        assert_eq!(marked.len(), item.len() + STALE_MARK_LEN);
        assert_eq!(strip_stale_mark(&marked), (true, &item[..]));
        // Marking again changes the id, not the item (no nesting).
        let again = mark_stale(&marked);
        assert_ne!(again, marked);
        assert_eq!(strip_stale_mark(&again), (true, &item[..]));
        // An item of the first format is a clean miss.
        let mut old = item.clone();
        old[2] = 1;
        assert!(matches!(
            c.decode_entry("k", &old, 1 << 20),
            Ok(Entry::Gone)
        ));
    }
}
