//! Memoize hit-path benchmark (harness = false; prints medians and ratios).
//!
//! * 1 KB value: a `Cache::get_with` hit vs a raw `get` of the same stored
//!   bytes on the same backend. Goals: <= 2.5x on the embedded backend,
//!   <= 1.05x over Redis and Memcached.
//! * 10 MB value: a `get_with` hit's read throughput vs a raw `get_many` of
//!   the same number and size of chunks.
//! * LZ4 figures on a text-like sample.
//!
//! Runs on the embedded backend, and on Memcached and Redis when the test
//! servers' variables are set (`source <(scripts/services env)`).
//! `cargo bench -p cachelock-bench --bench memoize`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use cachelock::{Cache, CacheBuilder, MemoryBackend, SharedBackend};

/// Median nanoseconds per op over `rounds` rounds of `per_round` ops.
async fn median_ns<F, Fut>(rounds: usize, per_round: usize, mut op: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Warm up.
    for _ in 0..per_round {
        op().await;
    }
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..per_round {
            op().await;
        }
        samples.push(start.elapsed().as_nanos() as f64 / per_round as f64);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// Medians of two ops measured in alternating rounds, so load drift on a
/// shared machine hits both alike.
async fn median_pair<A, AF, B, BF>(
    rounds: usize,
    per_round: usize,
    mut a: A,
    mut b: B,
) -> (f64, f64)
where
    A: FnMut() -> AF,
    AF: std::future::Future<Output = ()>,
    B: FnMut() -> BF,
    BF: std::future::Future<Output = ()>,
{
    for _ in 0..per_round {
        a().await;
        b().await;
    }
    let (mut sa, mut sb) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..per_round {
            a().await;
        }
        sa.push(start.elapsed().as_nanos() as f64 / per_round as f64);
        let start = Instant::now();
        for _ in 0..per_round {
            b().await;
        }
        sb.push(start.elapsed().as_nanos() as f64 / per_round as f64);
    }
    sa.sort_by(|x, y| x.total_cmp(y));
    sb.sort_by(|x, y| x.total_cmp(y));
    (sa[sa.len() / 2], sb[sb.len() / 2])
}

fn text(len: usize, seed: u64) -> String {
    // Pseudo-random printable ASCII: incompressible for LZ4.
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b' ' + (x % 95) as u8)
        })
        .collect()
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

async fn hit_1kb(o: CacheBuilder, label: &str, goal: f64, rounds: usize, per: usize) {
    let cache = o.build().unwrap();
    let b = cache.backend();
    let value = text(1024, 7);
    let key = format!("bench:1kb:{label}");
    let full = cache.full_key(key.as_str());
    let v: String = cache
        .get_with(key.as_str(), || async { value.clone() })
        .await;
    assert_eq!(v, value);
    // The same stored bytes under another key, read raw.
    let stored = b.get(&full).await.unwrap().unwrap();
    let raw_key = format!("bench:1kb-raw:{label}");
    b.set(&raw_key, &stored, Duration::from_secs(600))
        .await
        .unwrap();

    let (raw, memo) = median_pair(
        rounds,
        per,
        || async {
            std::hint::black_box(b.get(&raw_key).await.unwrap());
        },
        || async {
            let v: String = cache
                .get_with(key.as_str(), || async { String::new() })
                .await;
            std::hint::black_box(v);
        },
    )
    .await;
    // A hit asks the backend for the value's key alone; with namespace
    // invalidation on, for it and the generation key in one get_many.
    let two = [raw_key.clone(), format!("{raw_key}:#gen")];
    let two: Vec<&str> = two.iter().map(String::as_str).collect();
    let (raw_again, raw_two) = median_pair(
        rounds,
        per,
        || async {
            std::hint::black_box(b.get(&raw_key).await.unwrap());
        },
        || async {
            std::hint::black_box(b.get_many(&two).await.unwrap());
        },
    )
    .await;
    let raw_decode = median_ns(rounds, per, || async {
        let bytes = b.get(&raw_key).await.unwrap().unwrap();
        // What any cache client must do at least: decode the value (it
        // follows the inline header and the freshness envelope).
        let body = &bytes[9 + cachelock::memoize::ENVELOPE_OVERHEAD..bytes.len() - 8];
        let s: String = postcard::from_bytes(body).unwrap_or_default();
        std::hint::black_box(s);
    })
    .await;
    let key_ns = median_ns(rounds, per, || async {
        std::hint::black_box(cache.full_key(key.as_str()));
    })
    .await;
    let get_ns = median_ns(rounds, per, || async {
        std::hint::black_box(cache.get::<String>(key.as_str()).await);
    })
    .await;
    println!(
        "  [{label}] parts: full key {} | Cache::get {} | raw get {} vs raw get_many of 2 keys {} ({:.2}x)",
        fmt_ns(key_ns),
        fmt_ns(get_ns),
        fmt_ns(raw_again),
        fmt_ns(raw_two),
        raw_two / raw_again
    );
    println!(
        "hit 1 KB [{label}] ({} stored bytes): raw get {} | raw get + decode {} | get_with {} | ratio get_with/raw get = {:.2}x (goal <= {goal}x), vs raw get + decode = {:.2}x",
        stored.len(),
        fmt_ns(raw),
        fmt_ns(raw_decode),
        fmt_ns(memo),
        memo / raw,
        memo / raw_decode
    );
}

async fn read_10mb(o: CacheBuilder, label: &str, rounds: usize, per: usize) {
    const LEN: usize = 10 << 20;
    let cache = o.build().unwrap();
    let b = cache.backend();
    let value = text(LEN, 11);
    let key = format!("bench:10mb:{label}");
    let v: String = cache
        .get_with(key.as_str(), || async { value.clone() })
        .await;
    assert_eq!(v.len(), LEN);
    // Raw chunks of the same count and size.
    let chunk = cachelock::memoize::DEFAULT_CHUNK_SIZE - cachelock::memoize::CHUNK_OVERHEAD;
    let keys: Vec<String> = (0..LEN.div_ceil(chunk))
        .map(|i| format!("bench:10mb-raw:{label}:{i}"))
        .collect();
    for (i, k) in keys.iter().enumerate() {
        let piece = &value.as_bytes()[i * chunk..((i + 1) * chunk).min(LEN)];
        b.set(k, piece, Duration::from_secs(600)).await.unwrap();
    }
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let raw = median_ns(rounds, per, || async {
        std::hint::black_box(b.get_many(&refs).await.unwrap());
    })
    .await;
    let raw_join = median_ns(rounds, per, || async {
        let parts = b.get_many(&refs).await.unwrap();
        let mut out = Vec::with_capacity(LEN);
        for p in parts.iter().flatten() {
            out.extend_from_slice(p);
        }
        std::hint::black_box(String::from_utf8(out).unwrap());
    })
    .await;
    let memo = median_ns(rounds, per, || async {
        let v: String = cache
            .get_with(key.as_str(), || async { String::new() })
            .await;
        std::hint::black_box(v);
    })
    .await;
    let mbps = |ns: f64| LEN as f64 / (1 << 20) as f64 / (ns / 1e9);
    println!(
        "read 10 MB [{label}] ({} chunks): raw get_many {} ({:.0} MB/s) | raw get_many + join + utf8 {} ({:.0} MB/s) | get_with {} ({:.0} MB/s) | ratio get_with/raw get_many = {:.2}x, vs raw + join = {:.2}x",
        keys.len(),
        fmt_ns(raw),
        mbps(raw),
        fmt_ns(raw_join),
        mbps(raw_join),
        fmt_ns(memo),
        mbps(memo),
        memo / raw,
        memo / raw_join
    );
}

async fn lz4_figures() {
    // Text-like data: JSON records.
    let sample: String = (0..20_000)
        .map(|i| {
            format!(
                "{{\"id\":{i},\"name\":\"user-{}\",\"active\":{},\"score\":{}}},",
                i * 7919 % 10007,
                i % 3 == 0,
                i % 97
            )
        })
        .collect();
    let bytes = sample.as_bytes();
    let compressed = lz4_flex::block::compress(bytes);
    let c = median_ns(21, 5, || async {
        std::hint::black_box(lz4_flex::block::compress(bytes));
    })
    .await;
    let out = std::cell::RefCell::new(vec![0u8; bytes.len()]);
    let d = median_ns(21, 5, || async {
        let mut out = out.borrow_mut();
        std::hint::black_box(lz4_flex::block::decompress_into(&compressed, &mut out).unwrap());
    })
    .await;
    let mbps = |ns: f64| bytes.len() as f64 / (1 << 20) as f64 / (ns / 1e9);
    println!(
        "lz4_flex on {:.1} MB of JSON-like text: ratio {:.2} ({} -> {} bytes), compress {:.0} MB/s, decompress {:.0} MB/s",
        bytes.len() as f64 / (1 << 20) as f64,
        bytes.len() as f64 / compressed.len() as f64,
        bytes.len(),
        compressed.len(),
        mbps(c),
        mbps(d)
    );
}

fn main() {
    // `cargo test --benches` passes --bench only when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        println!("memoize bench: run with `cargo bench` to measure");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // `CACHELOCK_BENCH_ONLY=memory-hit`: the embedded default 1 KB hit
    // alone, few rounds (for callgrind).
    let only_hit = std::env::var("CACHELOCK_BENCH_ONLY").is_ok_and(|v| v == "memory-hit");
    rt.block_on(async {
        let b: SharedBackend = Arc::new(MemoryBackend::new());
        println!("backend: MemoryBackend (embedded)");
        if only_hit {
            hit_1kb(Cache::builder(b.clone()), "default", 2.5, 11, 2_000).await;
            return;
        }
        hit_1kb(Cache::builder(b.clone()), "default", 2.5, 101, 2_000).await;
        hit_1kb(
            Cache::builder(b.clone()).compression(false),
            "no-compression",
            2.5,
            101,
            2_000,
        )
        .await;
        hit_1kb(
            Cache::builder(b.clone()).encryption_key(b"0123456789abcdef"),
            "encrypted",
            2.5,
            101,
            2_000,
        )
        .await;
        hit_1kb(
            Cache::builder(b.clone()).namespace_invalidation(true),
            "namespace-invalidation",
            2.5,
            101,
            2_000,
        )
        .await;
        read_10mb(Cache::builder(b.clone()), "default", 21, 5).await;
        lz4_figures().await;
        match std::env::var("CACHELOCK_TEST_MEMCACHED_URLS") {
            Ok(urls) if !urls.is_empty() => {
                let first = urls
                    .trim_start_matches("memcached://")
                    .split(',')
                    .next()
                    .unwrap_or_default();
                let url = format!("memcached://{first}");
                let mc: SharedBackend =
                    Arc::new(cachelock::MemcachedBackend::connect(&url).await.unwrap());
                println!("backend: Memcached at {url} (one server, loopback)");
                let suffix = std::process::id();
                // Shared servers: bench values expire after 10 minutes.
                let shared = || Cache::builder(mc.clone()).expiration(Duration::from_secs(600));
                hit_1kb(shared(), &format!("default-{suffix}"), 1.05, 51, 200).await;
                read_10mb(shared(), &format!("default-{suffix}"), 11, 2).await;
            }
            _ => println!("Memcached: CACHELOCK_TEST_MEMCACHED_URLS not set; skipped"),
        }
        match std::env::var("CACHELOCK_TEST_REDIS_URL") {
            Ok(url) if !url.is_empty() => {
                let rd: SharedBackend =
                    Arc::new(cachelock::RedisBackend::connect(&url).await.unwrap());
                println!("backend: Redis at {url} (standalone, loopback)");
                let suffix = std::process::id();
                // Shared servers: bench values expire after 10 minutes.
                let shared = || Cache::builder(rd.clone()).expiration(Duration::from_secs(600));
                hit_1kb(shared(), &format!("default-{suffix}"), 1.05, 51, 200).await;
                read_10mb(shared(), &format!("default-{suffix}"), 11, 2).await;
            }
            _ => println!("Redis: CACHELOCK_TEST_REDIS_URL not set; skipped"),
        }
    });
}
