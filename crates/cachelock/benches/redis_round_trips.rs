//! Round trips of the Redis backend: raw single `get`s against uncontended
//! lock cycles (`CacheLock::try_acquire` + `LockGuard::release`), with the
//! same client, in one run.
//!
//! ```text
//! source <(scripts/services env)
//! cargo bench -p cachelock --bench redis_round_trips
//! ```
//!
//! Goal: a lock cycle costs at most 2.2 raw round trips, i.e. cycles/s is at
//! least 0.45x gets/s. Skips (with a message) when `CACHELOCK_TEST_REDIS_URL`
//! is not set. `REDIS_BENCH_OPS` and `REDIS_BENCH_RUNS` change the size.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use cachelock::{CacheLock, LockOptions, RedisBackend, SharedBackend};

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

async fn gets_per_sec(backend: &SharedBackend, key: &str, ops: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..ops {
        let v = backend.get(key).await.expect("get");
        assert!(v.is_some());
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

async fn cycles_per_sec(lock: &CacheLock, ops: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..ops {
        let guard = lock.try_acquire().await.expect("uncontended acquire");
        let released = guard.release().await.expect("release");
        assert_eq!(released, cachelock::lock::Released::Released);
    }
    ops as f64 / start.elapsed().as_secs_f64()
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
        let backend: SharedBackend = Arc::new(RedisBackend::connect(&url).await.expect("connect"));
        let pid = std::process::id();
        let get_key = format!("cachelock-bench:get:{pid}");
        let lock_key = format!("cachelock-bench:lock:{pid}");
        backend
            .set(&get_key, b"a small value", Duration::from_secs(300))
            .await
            .unwrap();
        let lock = CacheLock::new(
            backend.clone(),
            lock_key,
            LockOptions::new().lease(Duration::from_secs(30)),
        )
        .unwrap();

        // Warm up: connection, script cache, CPU frequency.
        gets_per_sec(&backend, &get_key, ops / 4).await;
        cycles_per_sec(&lock, ops / 4).await;

        let (mut gets, mut cycles, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for run in 1..=runs {
            let g = gets_per_sec(&backend, &get_key, ops).await;
            let c = cycles_per_sec(&lock, ops).await;
            println!(
                "run {run}: {g:>9.0} gets/s  {c:>9.0} lock cycles/s  ratio {:.3}",
                c / g
            );
            ratios.push(c / g);
            gets.push(g);
            cycles.push(c);
        }
        backend.delete(&get_key).await.unwrap();

        let (g, c) = (median(gets), median(cycles));
        let ratio = c / g;
        println!("redis {url}: {runs} runs x {ops} ops, sequential, one client");
        println!("  raw get:          median {g:>9.0} ops/s  ({:.1} us each)", 1e6 / g);
        println!("  lock cycle:       median {c:>9.0} ops/s  ({:.1} us each)", 1e6 / c);
        println!(
            "  ratio cycle/get:  {ratio:.3}  (a cycle costs {:.2} raw round trips; goal >= 0.45, i.e. <= 2.2)",
            1.0 / ratio
        );
        println!(
            "  median of the per-run ratios (each run's gets and cycles are adjacent): {:.3}",
            median(ratios)
        );
        println!("  goal {}", if ratio >= 0.45 { "MET" } else { "MISSED" });
    });
}
