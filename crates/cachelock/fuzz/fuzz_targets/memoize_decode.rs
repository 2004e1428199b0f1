//! The memoize decoder (inline items, manifests, chunks, stream frames)
//! never panics and never allocates much more than it was given, whatever
//! the cache holds. The target frames the fuzzer's bytes with a valid
//! header and checksum (optionally), so the fuzzer reaches the decoding
//! behind the checksum instead of stopping at it.
#![no_main]

use cachelock::memoize::fuzz_decode;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Manifest {
    total_len: u64,
    chunk_count: u32,
    segment_size: u32,
    write_id: u64,
    checksum: u64,
}

#[derive(Arbitrary, Debug)]
struct Chunk {
    flags: u8,
    write_id: u64,
    index: u32,
    plain_len: u32,
    body: Vec<u8>,
    /// Take write id, index and length from the manifest.
    consistent: bool,
}

#[derive(Arbitrary, Debug)]
enum Entry {
    /// Bytes as they are (no header, no checksum).
    Raw(Vec<u8>),
    /// An inline item: flags, claimed plaintext length, body.
    Inline { flags: u8, plain_len: u32, body: Vec<u8> },
    /// A manifest with these fields.
    Manifest { flags: u8, fields: Manifest, trailing: Vec<u8> },
    /// A manifest frame around arbitrary bytes.
    ManifestBytes { flags: u8, body: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    key: String,
    entry: Entry,
    chunks: Vec<Chunk>,
    encrypted: bool,
    max_value_size: u32,
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn framed(mut content: Vec<u8>) -> Vec<u8> {
    let sum = xxhash_rust::xxh3::xxh3_64(&content);
    content.extend_from_slice(&sum.to_le_bytes());
    content
}

fuzz_target!(|input: Input| {
    let header = |kind: u8, flags: u8| vec![0xC1, 0x0C, 1, kind, flags];
    let mut manifest = None;
    let entry = match input.entry {
        Entry::Raw(b) => b,
        Entry::Inline { flags, plain_len, body } => {
            let mut c = header(1, flags);
            c.extend_from_slice(&plain_len.to_le_bytes());
            c.extend_from_slice(&body);
            framed(c)
        }
        Entry::Manifest { flags, fields, trailing } => {
            let mut c = header(2, flags);
            varint(&mut c, fields.total_len);
            varint(&mut c, u64::from(fields.chunk_count));
            varint(&mut c, u64::from(fields.segment_size));
            varint(&mut c, fields.write_id);
            varint(&mut c, fields.checksum);
            c.extend_from_slice(&trailing);
            manifest = Some(fields);
            framed(c)
        }
        Entry::ManifestBytes { flags, body } => {
            let mut c = header(2, flags);
            c.extend_from_slice(&body);
            framed(c)
        }
    };
    let chunks: Vec<Vec<u8>> = input
        .chunks
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            let (write_id, index, plain_len) = match (&manifest, ch.consistent) {
                (Some(m), true) => {
                    let seg = u64::from(m.segment_size);
                    let start = i as u64 * seg;
                    let len = m.total_len.saturating_sub(start).min(seg);
                    (m.write_id, i as u32, u32::try_from(len).unwrap_or(u32::MAX))
                }
                _ => (ch.write_id, ch.index, ch.plain_len),
            };
            let mut c = header(3, ch.flags);
            c.extend_from_slice(&write_id.to_le_bytes());
            c.extend_from_slice(&index.to_le_bytes());
            c.extend_from_slice(&plain_len.to_le_bytes());
            c.extend_from_slice(&ch.body);
            framed(c)
        })
        .collect();
    let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    let stored: usize = entry.len() + chunks.iter().map(Vec::len).sum::<usize>();
    let secret: &[u8] = b"fuzz secret";
    let max = (input.max_value_size as usize).clamp(1, 512 << 20);
    if let Ok((plain, frames)) = fuzz_decode(
        &input.key,
        &entry,
        &refs,
        input.encrypted.then_some(secret),
        max,
    ) {
        // LZ4 expands at most ~255 times: the plaintext is bounded by the
        // bytes actually stored.
        assert!(plain.len() <= stored.saturating_mul(256) + 16);
        assert!(frames <= plain.len());
    }
});
