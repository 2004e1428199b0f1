//! Round trips of a memoize cold miss (a key nobody has: read, lock, compute,
//! store, release), on the standalone Redis and on Memcached, with the same
//! client as a raw `get`, in one run. Two ways of counting:
//!
//! * **backend calls**, counted by a wrapper around the backend: every call
//!   these backends make is one round trip (see their operation tables;
//!   on the standalone Redis and Memcached `add_reading` is one too), so
//!   the count is the round trips of one miss, made one after another;
//! * **time** of a miss in raw `get`s (misses/s against gets/s, in blocks
//!   that alternate, so machine load falls on both alike): what the round
//!   trips cost, serialisation and the compute (none here) included.
//!
//! Cases: `get_with` (the default handle), and `try_get_with` with shared
//! failures (a miss then also reads the failure record).
//!
//! ```text
//! source <(scripts/services env)
//! cargo bench -p cachelock-bench --bench miss_round_trips
//! ```
//!
//! Needs `CACHELOCK_TEST_REDIS_URL` and `CACHELOCK_TEST_MEMCACHED_URLS`
//! (skips, with a message, a backend whose variable is not set); uses the
//! first Memcached server only. `MISS_BENCH_OPS` and `MISS_BENCH_RUNS`
//! change the size (default: 5 runs of 1000 misses each).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use cachelock::backend::ReleaseWatch;
use cachelock::{
    AddRead, Backend, BackendResult, Cache, Grant, Listed, LockAdd, MemcachedBackend, Queued,
    RedisBackend, SharedBackend, TokenCheck, ValueFormat, Version,
};

const BLOCK: usize = 50;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A backend that counts the calls that reach the server.
#[derive(Debug)]
struct Counting {
    inner: SharedBackend,
    calls: AtomicU64,
}

impl Counting {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl Backend for Counting {
    async fn get(&self, key: &str) -> BackendResult<Option<Bytes>> {
        self.count();
        self.inner.get(key).await
    }
    async fn get_many(&self, keys: &[&str]) -> BackendResult<Vec<Option<Bytes>>> {
        self.count();
        self.inner.get_many(keys).await
    }
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<()> {
        self.count();
        self.inner.set(key, value, ttl).await
    }
    async fn set_many(&self, items: &[(&str, &[u8])], ttl: Duration) -> BackendResult<()> {
        self.count();
        self.inner.set_many(items, ttl).await
    }
    async fn add(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<bool> {
        self.count();
        self.inner.add(key, value, ttl).await
    }
    async fn add_queued(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<Queued> {
        self.count();
        self.inner.add_queued(key, value, ttl).await
    }
    async fn leave_queue(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<()> {
        self.count();
        self.inner.leave_queue(key, value, ttl).await
    }
    async fn set_if(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Duration,
    ) -> BackendResult<bool> {
        self.count();
        self.inner.set_if(key, expected, value, ttl).await
    }
    async fn touch(&self, key: &str, ttl: Duration) -> BackendResult<bool> {
        self.count();
        self.inner.touch(key, ttl).await
    }
    async fn delete(&self, key: &str) -> BackendResult<bool> {
        self.count();
        self.inner.delete(key).await
    }
    async fn incr(&self, key: &str, delta: u64) -> BackendResult<u64> {
        self.count();
        self.inner.incr(key, delta).await
    }
    async fn delete_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        hold: Duration,
    ) -> BackendResult<TokenCheck> {
        self.count();
        self.inner.delete_if_eq(key, expected, hold).await
    }
    async fn add_fenced(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        format: ValueFormat,
    ) -> BackendResult<Option<Grant>> {
        self.count();
        self.inner.add_fenced(key, value, ttl, format).await
    }
    async fn add_reading(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        add: LockAdd,
        keys: &[&str],
    ) -> BackendResult<AddRead> {
        self.count();
        self.inner.add_reading(key, value, ttl, add, keys).await
    }
    async fn fence(&self, key: &str) -> BackendResult<Option<u64>> {
        self.count();
        self.inner.fence(key).await
    }
    async fn delete_if_version(
        &self,
        key: &str,
        expected: &[u8],
        version: Option<Version>,
        hold: Duration,
    ) -> BackendResult<TokenCheck> {
        self.count();
        self.inner
            .delete_if_version(key, expected, version, hold)
            .await
    }
    async fn extend_if_version(
        &self,
        key: &str,
        expected: &[u8],
        version: Option<Version>,
        ttl: Duration,
    ) -> BackendResult<(TokenCheck, Option<Version>)> {
        self.count();
        self.inner
            .extend_if_version(key, expected, version, ttl)
            .await
    }
    async fn extend_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        ttl: Duration,
    ) -> BackendResult<TokenCheck> {
        self.count();
        self.inner.extend_if_eq(key, expected, ttl).await
    }
    async fn ttl(&self, key: &str) -> BackendResult<Option<Duration>> {
        self.count();
        self.inner.ttl(key).await
    }
    async fn list(&self, prefix: &str, limit: usize) -> BackendResult<Vec<Listed>> {
        self.count();
        self.inner.list(prefix, limit).await
    }
    async fn watch_release(&self, key: &str) -> ReleaseWatch {
        self.inner.watch_release(key).await
    }
    fn watch_release_now(&self, key: &str) -> Option<ReleaseWatch> {
        self.inner.watch_release_now(key)
    }
    fn handed_off_at(&self, key: &str) -> Option<tokio::time::Instant> {
        self.inner.handed_off_at(key)
    }
    fn encode_lock_value(&self, text: &str, format: ValueFormat) -> Bytes {
        self.inner.encode_lock_value(text, format)
    }
    fn decode_lock_value(&self, value: &[u8], format: ValueFormat) -> Option<String> {
        self.inner.decode_lock_value(value, format)
    }
    fn atomic_token_ops(&self) -> bool {
        self.inner.atomic_token_ops()
    }
    fn max_value_size(&self) -> usize {
        self.inner.max_value_size()
    }
}

/// `n` raw gets of one key.
async fn gets(backend: &SharedBackend, key: &str, n: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        assert!(backend.get(key).await.expect("get").is_some());
    }
    start.elapsed()
}

/// `n` cold misses: keys `prefix:next..next+n`, each computed and stored.
async fn misses(
    cache: &Cache,
    prefix: &str,
    next: &mut usize,
    n: usize,
    fallible: bool,
) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let key = format!("{prefix}:{next}");
        *next += 1;
        let v: u64 = if fallible {
            cache
                .try_get_with(key.as_str(), || async { Ok::<_, std::io::Error>(7) })
                .await
                .expect("compute")
        } else {
            cache.get_with(key.as_str(), || async { 7 }).await
        };
        assert_eq!(v, 7);
    }
    start.elapsed()
}

async fn measure(name: &str, raw: SharedBackend, ops: usize, runs: usize) {
    let counting = Arc::new(Counting {
        inner: raw.clone(),
        calls: AtomicU64::new(0),
    });
    let backend: SharedBackend = counting.clone();
    let pid = std::process::id();
    let get_key = format!("cachelock-bench:miss-get:{pid}");
    raw.set(&get_key, &[7u8; 36], Duration::from_secs(300))
        .await
        .unwrap();
    println!("{name}: {runs} runs x {ops} cold misses, sequential, one client");
    for fallible in [false, true] {
        let mut builder = Cache::builder(backend.clone())
            .namespace(format!("cachelock-bench-miss-{pid}-{fallible}"))
            .expiration(Duration::from_secs(60));
        if fallible {
            builder = builder.share_failures(Duration::from_secs(5));
        }
        let cache = builder.build().unwrap();
        let case = if fallible {
            "try_get_with, shared failures"
        } else {
            "get_with"
        };
        let prefix = "k";
        let mut next = 0;
        // Warm up: connections, script cache.
        misses(&cache, prefix, &mut next, ops / 10, fallible).await;
        gets(&raw, &get_key, ops / 10).await;

        let before = counting.calls.load(Ordering::Relaxed);
        misses(&cache, prefix, &mut next, ops, fallible).await;
        let calls = counting.calls.load(Ordering::Relaxed) - before;

        let (mut m_all, mut g_all, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let blocks = ops.div_ceil(BLOCK);
        let n = blocks * BLOCK;
        for _ in 0..runs {
            let (mut m, mut g) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..blocks {
                m += misses(&cache, prefix, &mut next, BLOCK, fallible).await;
                g += gets(&raw, &get_key, BLOCK).await;
            }
            let (m, g) = (n as f64 / m.as_secs_f64(), n as f64 / g.as_secs_f64());
            m_all.push(m);
            g_all.push(g);
            ratios.push(g / m);
        }
        let (m, g) = (median(m_all), median(g_all));
        println!("  {case}:");
        println!(
            "    backend calls per cold miss   {:>8.2}   ({calls} calls for {ops} misses)",
            calls as f64 / ops as f64
        );
        println!(
            "    cold miss                     {m:>8.0} /s  ({:.1} us each)",
            1e6 / m
        );
        println!(
            "    raw get                       {g:>8.0} /s  ({:.1} us each)",
            1e6 / g
        );
        println!(
            "    a cold miss costs             {:>8.2} raw gets (median of the runs' ratios)",
            median(ratios)
        );
        cache.close().await;
    }
    raw.delete(&get_key).await.unwrap();
}

fn main() {
    let redis = std::env::var("CACHELOCK_TEST_REDIS_URL")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let memcached = std::env::var("CACHELOCK_TEST_MEMCACHED_URLS")
        .ok()
        .filter(|v| !v.trim().is_empty());
    if redis.is_none() && memcached.is_none() {
        eprintln!(
            "SKIPPED: neither CACHELOCK_TEST_REDIS_URL nor CACHELOCK_TEST_MEMCACHED_URLS is set; \
             run `source <(scripts/services env)` first"
        );
        return;
    }
    let ops = env_usize("MISS_BENCH_OPS", 1000);
    let runs = env_usize("MISS_BENCH_RUNS", 5);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match &redis {
            Some(url) => {
                let b: SharedBackend = Arc::new(RedisBackend::connect(url).await.expect("connect"));
                measure(&format!("redis {url}"), b, ops, runs).await;
            }
            None => eprintln!("SKIPPED redis: CACHELOCK_TEST_REDIS_URL is not set"),
        }
        match &memcached {
            Some(urls) => {
                let first = urls
                    .trim_start_matches("memcached://")
                    .split(',')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                let b: SharedBackend = Arc::new(
                    MemcachedBackend::connect(&first)
                        .await
                        .expect("connect to memcached"),
                );
                measure(&format!("memcached {first}"), b, ops, runs).await;
            }
            None => eprintln!("SKIPPED memcached: CACHELOCK_TEST_MEMCACHED_URLS is not set"),
        }
    });
}
