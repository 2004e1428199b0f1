//! Bad input (issue 6): keys with NUL, newline, spaces and protocol
//! injections, 1 MB keys, through the KeyBuilder and raw into every backend;
//! values at and over every size limit. Each gets a clear error or works;
//! nothing panics, nothing collides, and nothing valid is lost. Run on the
//! embedded backend, Redis and Memcached (the shared test servers).
#![cfg(all(feature = "redis", feature = "memcached"))]
#![allow(clippy::unwrap_used)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use cachelock::key::is_memcached_safe;
use cachelock::{
    BackendError, CacheLock, KeyBuilder, LockOptions, MemcachedBackend, MemoryBackend,
    RedisBackend, RedisOptions, Released, SharedBackend, TokenCheck,
};
use common::unique_key;

const LONG: Duration = Duration::from_secs(60);

/// The embedded backend, the shared Redis and the shared Memcached (all
/// three servers); tests that use it need the test servers.
async fn backends() -> Vec<(&'static str, SharedBackend)> {
    let url = common::server_env("CACHELOCK_TEST_REDIS_URL");
    let urls = common::server_env("CACHELOCK_TEST_MEMCACHED_URLS");
    vec![
        ("memory", Arc::new(MemoryBackend::new())),
        (
            "redis",
            Arc::new(RedisBackend::connect(&url).await.unwrap()),
        ),
        (
            "memcached",
            Arc::new(MemcachedBackend::connect(&urls).await.unwrap()),
        ),
    ]
}

/// Nasty key material: control bytes, spaces, protocol injections for both
/// servers' text protocols, escapes that look like the builder's own,
/// non-ASCII, and very long keys.
fn nasty_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "a\0b",
        "\0",
        "a\nb",
        "a\r\nb",
        "a b",
        " ",
        "\t\x7f\x01",
        "k 0 0 1\r\nX\r\nset evil 0 0 4\r\nevil",
        "k\r\nmg evil v\r\n",
        "*1\r\n$4\r\nPING\r\n",
        "a\\x00b",
        "a%3Ab:c",
        "é clé ünïcödé 🔒",
        "b64:YWJj",
    ]
    .map(String::from)
    .to_vec();
    keys.push("k".repeat(250));
    keys.push("k".repeat(251));
    keys.push("k".repeat(1 << 20));
    keys.push("é".repeat(1 << 19));
    keys.push(format!("{}\n{}", "x".repeat(300), " ".repeat(300)));
    keys
}

/// Every key built by the KeyBuilder from nasty input is Memcached-safe,
/// works in every backend, and distinct inputs keep distinct values.
#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn nasty_keys_through_the_key_builder() {
    let keys = KeyBuilder::new(unique_key("bad-keys"));
    let secret = KeyBuilder::new("ns").secret(b"secret".to_vec());
    for (name, b) in backends().await {
        let mut built = Vec::new();
        for (i, raw) in nasty_keys().iter().enumerate() {
            for k in [
                keys.build(raw.as_str()),
                keys.build([raw.as_str(), "part"]),
                secret.build(raw.as_str()),
            ] {
                assert!(is_memcached_safe(&k), "{name}: unsafe built key {k:?}");
                built.push((k, format!("value {i}")));
            }
        }
        for (k, v) in &built {
            b.set(k, v.as_bytes(), LONG).await.unwrap();
        }
        // No two inputs share a key (the escape is one-to-one, backslashes
        // included), and every key holds its own value.
        let distinct: std::collections::HashSet<&String> = built.iter().map(|(k, _)| k).collect();
        assert_eq!(
            distinct.len(),
            built.len(),
            "{name}: two nasty inputs built one key"
        );
        for (k, v) in &built {
            let got = b.get(k).await.unwrap();
            let got = String::from_utf8(got.unwrap().to_vec()).unwrap();
            assert_eq!(&got, v, "{name}: key {k:?}");
        }
        // A lock on a built nasty key works and excludes.
        let lock = CacheLock::new(
            b.clone(),
            keys.build("lock \n\0 key"),
            LockOptions::default(),
        )
        .unwrap();
        let g = lock.try_acquire().await.unwrap();
        let again = CacheLock::new(b.clone(), lock.key(), LockOptions::default()).unwrap();
        assert!(again.try_acquire().await.unwrap_err().is_held());
        assert_eq!(g.release().await.unwrap(), Released::Released);
    }
}

/// The same keys given raw to every backend operation: each works (the
/// Memcached backend encodes what it cannot send as is) or is a clear
/// error; never a panic, never a protocol injection, and the connection
/// stays in step afterwards.
#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn nasty_keys_raw_into_every_backend_operation() {
    for (name, b) in backends().await {
        let marker = unique_key("raw-marker");
        b.set(&marker, b"marker", LONG).await.unwrap();
        let prefix = unique_key("raw");
        for (i, raw) in nasty_keys().iter().enumerate() {
            let k = format!("{prefix}{raw}");
            let v = format!("raw value {i}");
            let ok = |r: Result<(), BackendError>| match r {
                Ok(()) => true,
                Err(BackendError::InvalidKey { .. }) => false,
                Err(e) => panic!("{name}: key {i}: not a clear error: {e:?}"),
            };
            if !ok(b.set(&k, v.as_bytes(), LONG).await) {
                continue;
            }
            assert_eq!(
                b.get(&k).await.unwrap().as_deref(),
                Some(v.as_bytes()),
                "{name}: key {i}"
            );
            let many = b.get_many(&[&k, &marker]).await.unwrap();
            assert_eq!(many[0].as_deref(), Some(v.as_bytes()), "{name}: key {i}");
            assert_eq!(many[1].as_deref(), Some(&b"marker"[..]), "{name}: key {i}");
            assert!(!b.add(&k, b"other", LONG).await.unwrap(), "{name}: key {i}");
            assert!(b.touch(&k, LONG).await.unwrap(), "{name}: key {i}");
            assert_eq!(
                b.extend_if_eq(&k, v.as_bytes(), LONG).await.unwrap(),
                TokenCheck::Matched
            );
            assert_eq!(
                b.delete_if_eq(&k, b"not it", LONG).await.unwrap(),
                TokenCheck::Mismatch
            );
            assert_eq!(
                b.delete_if_eq(&k, v.as_bytes(), LONG).await.unwrap(),
                TokenCheck::Matched
            );
            assert_eq!(b.get(&k).await.unwrap(), None, "{name}: key {i}");
            b.set_many(&[(&k, b"many"), (&marker, b"marker")], LONG)
                .await
                .unwrap();
            assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"many"[..]));
            assert_eq!(b.incr(&format!("{k}#n"), 3).await.unwrap(), 3);
            assert!(b.delete(&k).await.unwrap());
            let _ = b.delete(&format!("{k}#n")).await;
        }
        // Nothing was injected: the marker is intact and no "evil" key
        // appeared.
        assert_eq!(
            b.get(&marker).await.unwrap().as_deref(),
            Some(&b"marker"[..])
        );
        assert_eq!(b.get("evil").await.unwrap(), None, "{name}: injection");
    }
}

/// A lock key given raw (not built) with spaces, newlines and a 1 MB
/// length: the lock works, or fails with a backend error; it is never
/// reported as held by someone else.
#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn raw_lock_keys() {
    assert!(
        CacheLock::new(Arc::new(MemoryBackend::new()), "", LockOptions::default())
            .unwrap_err()
            .to_string()
            .contains("must be provided")
    );
    for (name, b) in backends().await {
        for raw in [" \n\0", "a b\r\nc", &"L".repeat(1 << 20)] {
            let key = format!("{}{raw}", unique_key("raw-lock"));
            let lock = CacheLock::new(b.clone(), key, LockOptions::default()).unwrap();
            match lock.try_acquire().await {
                Ok(g) => {
                    let again =
                        CacheLock::new(b.clone(), lock.key(), LockOptions::default()).unwrap();
                    assert!(again.try_acquire().await.unwrap_err().is_held(), "{name}");
                    assert_eq!(g.release().await.unwrap(), Released::Released, "{name}");
                }
                Err(e) => assert!(e.as_backend().is_some(), "{name}: {e:?}"),
            }
        }
    }
}

/// Exactly the backend's `max_value_size` is stored; one byte more is
/// `ValueTooLarge` naming the key, on set, add and set_many, and nothing is
/// stored. An empty value is fine.
async fn check_value_limits(name: &str, b: &SharedBackend) {
    let limit = b.max_value_size();
    let k = unique_key("limit");
    let exact = vec![0xA5u8; limit];
    let over = vec![0x5Au8; limit + 1];

    b.set(&k, &exact, LONG).await.unwrap();
    assert_eq!(
        b.get(&k).await.unwrap().as_deref(),
        Some(&exact[..]),
        "{name}"
    );

    let too_large = |e: BackendError| match e {
        BackendError::ValueTooLarge {
            key,
            size,
            limit: l,
        } => {
            assert_eq!((size, l), (limit + 1, limit), "{name}");
            key
        }
        other => panic!("{name}: expected ValueTooLarge, got {other:?}"),
    };
    assert_eq!(too_large(b.set(&k, &over, LONG).await.unwrap_err()), k);
    assert_eq!(
        b.get(&k).await.unwrap().as_deref(),
        Some(&exact[..]),
        "{name}: the refused set changed nothing"
    );
    let k2 = unique_key("limit-add");
    assert_eq!(too_large(b.add(&k2, &over, LONG).await.unwrap_err()), k2);
    assert_eq!(b.get(&k2).await.unwrap(), None, "{name}");
    assert!(b.add(&k2, &exact, LONG).await.unwrap(), "{name}");
    let k3 = unique_key("limit-many");
    let err = b
        .set_many(&[(&k3, b"small"), (&k2, &over)], LONG)
        .await
        .unwrap_err();
    assert_eq!(too_large(err), k2);
    b.set_many(&[(&k3, &exact[..]), (&k2, b"")], LONG)
        .await
        .unwrap();
    assert_eq!(b.get(&k3).await.unwrap().as_deref(), Some(&exact[..]));
    assert_eq!(b.get(&k2).await.unwrap().as_deref(), Some(&b""[..]));
    for k in [&k, &k2, &k3] {
        b.delete(k).await.unwrap();
    }
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn values_at_and_over_the_size_limit() {
    let small: SharedBackend = Arc::new(MemoryBackend::new().with_max_value_size(1000));
    check_value_limits("memory (1000)", &small).await;
    let default: SharedBackend = Arc::new(MemoryBackend::new());
    check_value_limits("memory (default)", &default).await;
    let url = common::server_env("CACHELOCK_TEST_REDIS_URL");
    let b: SharedBackend = Arc::new(
        RedisBackend::connect_with(&url, RedisOptions::new().max_value_size(4096))
            .await
            .unwrap(),
    );
    check_value_limits("redis (4096)", &b).await;
    let urls = common::server_env("CACHELOCK_TEST_MEMCACHED_URLS");
    // The limit the servers reported (item_size_max less overhead).
    let b: SharedBackend = Arc::new(MemcachedBackend::connect(&urls).await.unwrap());
    check_value_limits("memcached", &b).await;
}

// ---------------------------------------------------------------------------
// Memoize: foreign, corrupt and hostile bytes in the cache

mod memoize_input {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use cachelock::memoize::FORMAT_VERSION;
    use cachelock::{CacheKey, SharedBackend};
    use futures_util::StreamExt;
    use serde::{Deserialize, Serialize};

    use super::common::memoize_cases::{Counter, mz};
    use super::common::opts::{Opts, memoize, memoize_iter};
    use super::{LONG, backends, common::unique_key};

    /// The manifest's fields as stored (postcard), to find chunk keys and
    /// to forge hostile manifests.
    #[derive(Debug, Serialize, Deserialize)]
    struct Body {
        total_len: u64,
        chunk_count: u32,
        segment_size: u32,
        write_id: u64,
        checksum: u64,
    }

    /// `content` followed by its XXH3-64, as every stored item ends.
    fn framed(content: &[u8]) -> Vec<u8> {
        let mut v = content.to_vec();
        v.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(content).to_le_bytes());
        v
    }

    /// A small xorshift generator: reproducible "random" bytes.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    async fn memo(b: &SharedBackend, key: &str, o: &Opts, n: &Counter, value: &[u8]) -> Vec<u8> {
        mz(b, key, o, n, value.to_vec()).await
    }

    fn chunked() -> Opts {
        Opts::new()
            .expiration(LONG)
            .compression(false)
            .chunk_size(1024)
    }

    /// The stored manifest of `key` and the keys of its chunks.
    async fn chunk_keys(b: &SharedBackend, o: &Opts, key: &str) -> (String, Vec<String>) {
        let full = o.full_key(&CacheKey::from(key));
        let raw = b.get(&full).await.unwrap().expect("a stored manifest");
        assert_eq!(&raw[..4], &[0xC1, 0x0C, FORMAT_VERSION, 2], "a manifest");
        let body: Body = postcard::from_bytes(&raw[5..raw.len() - 8]).unwrap();
        let keys = (0..body.chunk_count)
            .map(|i| format!("{full}:#{:016x}:{i}", body.write_id))
            .collect::<Vec<_>>();
        for k in &keys {
            assert!(b.get(k).await.unwrap().is_some(), "chunk key {k} exists");
        }
        (full, keys)
    }

    /// Random bytes (some with a valid-looking header) planted under the
    /// value key, one chunk key, or every chunk key: memoize recomputes and
    /// returns the right value every time, and stores it again.
    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn random_bytes_under_value_manifest_and_chunk_keys() {
        for (name, b) in backends().await {
            let mut rng = Rng(0x5EED_1234_ABCD_0001);
            let o = chunked();
            for round in 0..24u32 {
                let key = unique_key("planted");
                let len = 5_000 + (rng.next() % 5_000) as usize;
                let value = rng.bytes(len);
                let n = Counter::default();
                assert!(memo(&b, &key, &o, &n, &value).await == value);
                let (full, chunks) = chunk_keys(&b, &o, &key).await;
                let junk_len = (rng.next() % 2_000) as usize;
                let mut junk = rng.bytes(junk_len);
                if round % 2 == 0 && junk.len() >= 4 {
                    // Past the magic, version and kind checks.
                    junk[..4].copy_from_slice(&[0xC1, 0x0C, FORMAT_VERSION, 1 + (round % 3) as u8]);
                }
                match round % 3 {
                    0 => b.set(&full, &junk, LONG).await.unwrap(),
                    1 => {
                        let i = (rng.next() as usize) % chunks.len();
                        b.set(&chunks[i], &junk, LONG).await.unwrap()
                    }
                    _ => {
                        for c in &chunks {
                            b.set(c, &junk, LONG).await.unwrap();
                        }
                    }
                }
                let t = Instant::now();
                let got = memo(&b, &key, &o, &n, &value).await;
                assert!(got == value, "{name}: round {round}: wrong value");
                assert_eq!(n.get(), 2, "{name}: round {round}: recomputed");
                assert!(
                    t.elapsed() < Duration::from_secs(2),
                    "{name}: {:?}",
                    t.elapsed()
                );
                assert!(memo(&b, &key, &o, &n, &value).await == value);
                assert_eq!(n.get(), 2, "{name}: round {round}: stored again");
                // The same junk as an inline value and as a stream.
                let ik = unique_key("planted-inline");
                b.set(&ik, &junk, LONG).await.unwrap();
                let m = Counter::default();
                assert!(memo(&b, &ik, &Opts::new(), &m, b"ok").await == b"ok");
                assert_eq!(m.get(), 1);
                let sk = unique_key("planted-stream");
                b.set(&sk, &junk, LONG).await.unwrap();
                let items: Vec<u32> =
                    memoize_iter(&b, sk.as_str(), &o, (0..50u32).map(Ok::<_, Infallible>))
                        .map(|r| r.unwrap())
                        .collect()
                        .await;
                assert_eq!(items, (0..50).collect::<Vec<_>>(), "{name}");
            }
        }
    }

    /// The chunks of another write of the same key, copied under this
    /// write's chunk keys (what an interrupted or racing writer could
    /// leave): never decoded as part of the value.
    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn chunks_of_another_write_are_never_mixed_in() {
        for (name, b) in backends().await {
            let o = chunked();
            let key = unique_key("mixed");
            let (v1, v2, v3) = (vec![1u8; 6_000], vec![2u8; 6_000], vec![3u8; 6_000]);
            let n = Counter::default();
            memo(&b, &key, &o, &n, &v1).await;
            let (_, old_chunks) = chunk_keys(&b, &o, &key).await;
            let mut old = Vec::new();
            for k in &old_chunks {
                old.push(b.get(k).await.unwrap().unwrap());
            }
            memo(&b, &key, &o.clone().force_overwrite(true), &n, &v2).await;
            let (_, new_chunks) = chunk_keys(&b, &o, &key).await;
            assert_ne!(old_chunks, new_chunks, "each write has its own chunk keys");
            // One old chunk in the middle of the new write.
            b.set(&new_chunks[2], &old[2], LONG).await.unwrap();
            assert!(memo(&b, &key, &o, &n, &v3).await == v3, "{name}");
            assert_eq!(n.get(), 3, "{name}");
            // Every chunk of the old write in place of the new one's.
            let (_, newest) = chunk_keys(&b, &o, &key).await;
            for (k, raw) in newest.iter().zip(&old) {
                b.set(k, raw, LONG).await.unwrap();
            }
            let got = memo(&b, &key, &o, &n, &v2).await;
            assert!(got == v2, "{name}: mixed or stale chunks were decoded");
            assert_eq!(n.get(), 4, "{name}");
        }
    }

    /// Manifests (and inline items) with a valid checksum that claim 10^9
    /// chunks, a huge length or a huge decompressed size: refused at once,
    /// without a large allocation or fetch, and recomputed.
    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn hostile_claims_return_quickly_and_recompute() {
        let manifest = |flags: u8, total_len: u64, chunk_count: u32, segment_size: u32| {
            let mut content = vec![0xC1, 0x0C, FORMAT_VERSION, 2, flags];
            content.extend(
                postcard::to_allocvec(&Body {
                    total_len,
                    chunk_count,
                    segment_size,
                    write_id: 7,
                    checksum: 0,
                })
                .unwrap(),
            );
            framed(&content)
        };
        let inline_lz4 = |claim: u32| {
            let mut content = vec![0xC1, 0x0C, FORMAT_VERSION, 1, 1];
            content.extend_from_slice(&claim.to_le_bytes());
            content.extend_from_slice(&[0x1F, 0, 0, 0]);
            framed(&content)
        };
        for (name, b) in backends().await {
            let seg = 1_000u32;
            let hostile = [
                manifest(0, 1_000_000_000 * u64::from(seg), 1_000_000_000, seg),
                manifest(0, u64::from(u32::MAX) * 64, u32::MAX, 64),
                manifest(0, 1 << 40, (1u64 << 40).div_ceil(1 << 19) as u32, 1 << 19),
                manifest(0, 65_536 * 1_000, 65_536, 1_000),
                manifest(4, 1_000_000_000 * u64::from(seg), 1_000_000_000, seg),
                manifest(0, u64::MAX, u32::MAX, u32::MAX),
                inline_lz4(u32::MAX),
                inline_lz4(64 << 20),
            ];
            for (i, raw) in hostile.iter().enumerate() {
                let key = unique_key("hostile-claim");
                b.set(&key, raw, LONG).await.unwrap();
                let n = Counter::default();
                let t = Instant::now();
                assert!(memo(&b, &key, &Opts::new(), &n, b"safe").await == b"safe");
                assert_eq!(n.get(), 1, "{name}: claim {i}");
                let sk = unique_key("hostile-claim-stream");
                b.set(&sk, raw, LONG).await.unwrap();
                let items: Vec<u8> = memoize_iter(
                    &b,
                    sk.as_str(),
                    &Opts::new(),
                    [Ok::<_, Infallible>(1u8), Ok(2)],
                )
                .map(|r| r.unwrap())
                .collect()
                .await;
                assert_eq!(items, vec![1, 2], "{name}: claim {i}");
                assert!(
                    t.elapsed() < Duration::from_secs(2),
                    "{name}: claim {i} took {:?}",
                    t.elapsed()
                );
            }
        }
    }

    /// A manifest that claims 65,536 chunks (the most a reader accepts) that
    /// are not there costs one small batch of chunk reads, not a request
    /// for every key it claims: before the fix memoize asked for all 65,536
    /// keys in one `get_many` (twice, value and stream), which took over 2 s
    /// on Memcached under load.
    #[tokio::test]
    async fn a_claim_of_many_chunks_reads_one_batch() {
        let mut content = vec![0xC1, 0x0C, FORMAT_VERSION, 2, 0];
        content.extend(
            postcard::to_allocvec(&Body {
                total_len: 65_536 * 1_000,
                chunk_count: 65_536,
                segment_size: 1_000,
                write_id: 7,
                checksum: 0,
            })
            .unwrap(),
        );
        let raw = framed(&content);
        let wrap = super::common::memoize_cases::Wrap::new(std::sync::Arc::new(
            cachelock::MemoryBackend::new(),
        ));
        let b = wrap.shared();
        let key = unique_key("many-chunks");
        b.set(&key, &raw, LONG).await.unwrap();
        let n = Counter::default();
        assert!(memo(&b, &key, &Opts::new(), &n, b"safe").await == b"safe");
        assert_eq!(n.get(), 1);
        let sk = unique_key("many-chunks-stream");
        b.set(&sk, &raw, LONG).await.unwrap();
        let items: Vec<u8> = memoize_iter(
            &b,
            sk.as_str(),
            &Opts::new(),
            [Ok::<_, Infallible>(1u8), Ok(2)],
        )
        .map(|r| r.unwrap())
        .collect()
        .await;
        assert_eq!(items, vec![1, 2]);
        let asked: usize = wrap
            .ops()
            .iter()
            .map(|op| match op {
                super::common::memoize_cases::Op::GetMany(keys) => keys.len(),
                _ => 0,
            })
            .sum();
        assert!(asked <= 4 * 64, "asked for {asked} chunk keys");
    }

    /// A value encrypted with another key (same key names), a plain value
    /// read with a key, and an encrypted one read without: each a miss and
    /// a recompute, chunked and inline.
    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn wrong_encryption_key_is_a_miss() {
        for (name, b) in backends().await {
            let base = Opts::new()
                .namespace("bad-input")
                .key_secret(b"names")
                .expiration(LONG)
                .chunk_size(1024);
            let one = base.clone().encryption_key(b"key one");
            let two = base.clone().encryption_key(b"key two");
            for len in [100usize, 10_000] {
                let key = unique_key("wrong-enc");
                let n = Counter::default();
                let (v1, v2, v3) = (vec![1u8; len], vec![2u8; len], vec![3u8; len]);
                assert!(memo(&b, &key, &one, &n, &v1).await == v1);
                assert!(memo(&b, &key, &two, &n, &v2).await == v2, "{name}");
                assert_eq!(n.get(), 2, "{name}: {len}");
                assert!(memo(&b, &key, &base, &n, &v3).await == v3, "{name}");
                assert_eq!(n.get(), 3, "{name}: {len}");
                assert!(memo(&b, &key, &one, &n, &v1).await == v1, "{name}");
                assert_eq!(n.get(), 4, "{name}: {len}");
                assert!(memo(&b, &key, &one, &n, &v2).await == v1, "{name}: a hit");
                assert_eq!(n.get(), 4, "{name}: {len}");
            }
        }
    }

    /// The fuzz target's entry point decodes what memoize really stores
    /// (so the fuzzer starts from the real format), and refuses it under
    /// the wrong key or with a chunk missing.
    #[tokio::test]
    async fn fuzz_entry_point_decodes_real_items() {
        use cachelock::memoize::fuzz_decode;
        let b: SharedBackend = Arc::new(cachelock::MemoryBackend::new());
        let max = b.max_value_size();
        // (Encrypted: inline, since an encrypted manifest hides its chunk keys.)
        for o in [chunked(), Opts::new().encryption_key(b"k1"), Opts::new()] {
            let key = unique_key("fuzz-entry");
            let value: Vec<String> = (0..300).map(|i| format!("item {i}")).collect();
            let v = value.clone();
            memoize(
                &b,
                key.as_str(),
                &o,
                || async move { Ok::<_, Infallible>(v) },
            )
            .await
            .unwrap();
            let full = o.full_key(&CacheKey::from(key.as_str()));
            let entry = b.get(&full).await.unwrap().unwrap();
            let chunks = if entry[3] == 2 {
                let body: Body = postcard::from_bytes(&entry[5..entry.len() - 8]).unwrap();
                let mut chunks = Vec::new();
                for i in 0..body.chunk_count {
                    let k = format!("{full}:#{:016x}:{i}", body.write_id);
                    chunks.push(b.get(&k).await.unwrap().unwrap());
                }
                chunks
            } else {
                Vec::new()
            };
            let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_ref()).collect();
            let secret = o.full_key(&CacheKey::from("x")).len() == 64;
            let enc: Option<&[u8]> = secret.then_some(b"k1");
            let (plain, _) = fuzz_decode(&full, &entry, &refs, enc, max).unwrap();
            let decoded: Vec<String> = postcard::from_bytes(&plain).unwrap();
            assert_eq!(decoded, value);
            if secret {
                assert!(fuzz_decode(&full, &entry, &refs, Some(b"k2"), max).is_err());
                assert!(fuzz_decode(&full, &entry, &refs, None, max).is_err());
            }
            if !refs.is_empty() {
                assert!(fuzz_decode(&full, &entry, &refs[1..], enc, max).is_err());
            }
        }
    }
}
