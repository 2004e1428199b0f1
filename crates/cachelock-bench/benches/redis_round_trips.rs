//! Round trips of the Redis backend: raw single `get`s against uncontended
//! lock cycles (`CacheLock::try_acquire` + `LockGuard::release`), with the
//! same client, in one run.
//!
//! ```text
//! source <(scripts/services env)
//! cargo bench -p cachelock-bench --bench redis_round_trips
//! ```
//!
//! Goal: a lock cycle costs at most 2.2 raw round trips, i.e. cycles/s is at
//! least 0.45x gets/s. Skips (with a message) when `CACHELOCK_TEST_REDIS_URL`
//! is not set; measures the Cluster too when
//! `CACHELOCK_TEST_REDIS_CLUSTER_URLS` is set. `REDIS_BENCH_OPS` and
//! `REDIS_BENCH_RUNS` change the size (default: 5 runs of 2000 ops each).
//!
//! Each run times its gets, lock cycles and bare backend cycles in
//! alternating blocks of 100, so that load from other processes on the
//! machine falls on all three alike and their ratio stays meaningful.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use cachelock::lock::Released;
use cachelock::{CacheLock, LockOptions, RedisBackend, SharedBackend, TokenCheck};

const BLOCK: usize = 100;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// `n` single gets of one key.
async fn gets(backend: &SharedBackend, key: &str, n: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let v = backend.get(key).await.expect("get");
        assert!(v.is_some());
    }
    start.elapsed()
}

/// `n` uncontended lock cycles: non-blocking acquire, then release.
async fn cycles(lock: &CacheLock, n: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let guard = lock.try_acquire().await.expect("uncontended acquire");
        let released = guard.release().await.expect("release");
        assert_eq!(released, Released::Released);
    }
    start.elapsed()
}

/// The same two backend calls as a lock cycle, without the lock layer.
async fn backend_cycles(backend: &SharedBackend, key: &str, n: usize) -> Duration {
    let lease = Duration::from_secs(30);
    let start = Instant::now();
    for i in 0..n {
        let token = i.to_string();
        let added = backend
            .add(key, token.as_bytes(), lease)
            .await
            .expect("add");
        assert!(added);
        let check = backend
            .delete_if_eq(key, token.as_bytes(), lease)
            .await
            .expect("delete_if_eq");
        assert_eq!(check, TokenCheck::Matched);
    }
    start.elapsed()
}

fn per_sec(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

async fn measure(name: &str, backend: SharedBackend, ops: usize, runs: usize) {
    // One hash tag: on a Cluster all three keys live on the same node, so
    // the comparison is not between nodes.
    let tag = format!("{{cachelock-bench:{}}}", std::process::id());
    let get_key = format!("{tag}:get");
    let raw_key = format!("{tag}:raw");
    backend
        .set(&get_key, b"a small value", Duration::from_secs(300))
        .await
        .unwrap();
    let lock = CacheLock::new(
        backend.clone(),
        format!("{tag}:lock"),
        LockOptions::new().lease(Duration::from_secs(30)),
    )
    .unwrap();

    // Warm up: connection, script cache, CPU frequency.
    gets(&backend, &get_key, ops / 4).await;
    cycles(&lock, ops / 4).await;
    backend_cycles(&backend, &raw_key, ops / 4).await;

    println!("{name}: {runs} runs x {ops} ops, sequential, one client");
    let blocks = ops.div_ceil(BLOCK);
    let n = blocks * BLOCK;
    let (mut g_all, mut c_all, mut r_all, mut ratios) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let (mut g, mut c, mut r) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for _ in 0..blocks {
            g += gets(&backend, &get_key, BLOCK).await;
            c += cycles(&lock, BLOCK).await;
            r += backend_cycles(&backend, &raw_key, BLOCK).await;
        }
        let (g, c, r) = (per_sec(n, g), per_sec(n, c), per_sec(n, r));
        println!(
            "  run {run}: {g:>7.0} gets/s  {c:>7.0} lock cycles/s  ratio {:.3}   ({r:.0} add+delete_if_eq/s)",
            c / g
        );
        g_all.push(g);
        c_all.push(c);
        r_all.push(r);
        ratios.push(c / g);
    }
    backend.delete(&get_key).await.unwrap();

    let (g, c, r) = (median(g_all), median(c_all), median(r_all));
    let ratio = median(ratios);
    println!(
        "  raw get:           median {g:>7.0} ops/s  ({:.1} us each)",
        1e6 / g
    );
    println!(
        "  lock cycle:        median {c:>7.0} ops/s  ({:.1} us each)",
        1e6 / c
    );
    println!(
        "  add+delete_if_eq:  median {r:>7.0} ops/s  ({:.1} us each; the lock layer adds {:.1} us)",
        1e6 / r,
        1e6 / c - 1e6 / r
    );
    println!(
        "  ratio cycle/get:   median {ratio:.3}  (ratio of the medians {:.3}); a cycle costs {:.2} raw round trips",
        c / g,
        1.0 / ratio
    );
    println!(
        "  goal (ratio >= 0.45, i.e. at most 2.2 round trips): {}",
        if ratio >= 0.45 { "MET" } else { "MISSED" }
    );
}

fn main() {
    let Some(url) = std::env::var("CACHELOCK_TEST_REDIS_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
    else {
        eprintln!(
            "SKIPPED: CACHELOCK_TEST_REDIS_URL is not set; run `source <(scripts/services env)` first"
        );
        return;
    };
    let ops = env_usize("REDIS_BENCH_OPS", 2000);
    let runs = env_usize("REDIS_BENCH_RUNS", 5);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let standalone: SharedBackend =
            Arc::new(RedisBackend::connect(&url).await.expect("connect"));
        measure(&format!("redis {url}"), standalone, ops, runs).await;
        // The Cluster too, for information, when the test servers run one.
        if let Some(urls) = std::env::var("CACHELOCK_TEST_REDIS_CLUSTER_URLS")
            .ok()
            .filter(|v| !v.trim().is_empty())
        {
            let urls: Vec<&str> = urls.split(',').map(str::trim).collect();
            let cluster: SharedBackend = Arc::new(
                RedisBackend::connect_cluster(&urls)
                    .await
                    .expect("connect to the cluster"),
            );
            measure("redis cluster", cluster, ops, runs).await;
        }
    });
}
