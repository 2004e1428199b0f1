//! Throughput of the embedded in-memory backend and of an uncontended lock
//! cycle on it. Prints the median of several runs.
//!
//! `cargo bench -p cachelock-bench --bench memory`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachelock::{Backend, CacheLock, LockOptions, MemoryBackend, SharedBackend};

const RUNS: usize = 7;

/// Runs `ops` operations `RUNS` times; returns the median ops/s.
fn measure<F: FnMut(&tokio::runtime::Runtime, usize) -> usize>(
    rt: &tokio::runtime::Runtime,
    mut f: F,
) -> f64 {
    let mut rates: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let ops = f(rt, 200_000);
            ops as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[RUNS / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cache = Arc::new(MemoryBackend::new());
    let ttl = Duration::from_secs(600);
    let keys: Vec<String> = (0..1000).map(|i| format!("bench:key:{i}")).collect();
    rt.block_on(async {
        for k in &keys {
            cache.set(k, &[7u8; 100], ttl).await.expect("set");
        }
    });

    let get = measure(&rt, |rt, n| {
        rt.block_on(async {
            for i in 0..n {
                black_box(cache.get(&keys[i % keys.len()]).await.expect("get"));
            }
        });
        n
    });
    let mut round = 0u64;
    let add = measure(&rt, |rt, n| {
        round += 1;
        rt.block_on(async {
            for i in 0..n {
                let k = format!("bench:add:{round}:{i}");
                black_box(cache.add(&k, b"token", ttl).await.expect("add"));
            }
        });
        n
    });
    let shared: SharedBackend = Arc::new(MemoryBackend::new());
    let lock = CacheLock::new(shared, "bench:lock", LockOptions::default()).expect("lock");
    let cycle = measure(&rt, |rt, n| {
        let n = n / 4;
        rt.block_on(async {
            for _ in 0..n {
                let guard = lock.try_acquire().await.expect("acquire");
                let _ = black_box(guard.release().await.expect("release"));
            }
        });
        n
    });

    println!("in-memory backend, one task, median of {RUNS} runs:");
    println!("  get (100-byte value)         {:>12.0} ops/s", get);
    println!("  add (new key)                {:>12.0} ops/s", add);
    println!(
        "  lock cycle (try_acquire + release) {:>6.0} cycles/s",
        cycle
    );
    println!("  lock cycle / get ratio       {:>12.3}", cycle / get);
}
