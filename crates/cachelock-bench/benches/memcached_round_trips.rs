//! Round trips against a real Memcached: raw single `get`s vs uncontended
//! lock cycles (`CacheLock::try_acquire` + `LockGuard::release`), with the
//! same client, in one run. Prints the median of several runs of each and
//! their ratio. Goal (issue 3): a lock cycle costs at most 3.3 raw round
//! trips, i.e. cycles/s >= 0.30 x gets/s.
//!
//! Uses the first server of `CACHELOCK_TEST_MEMCACHED_URLS` (start it with
//! `scripts/services start` and `source <(scripts/services env)`):
//!
//! `cargo bench -p cachelock-bench --bench memcached_round_trips`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachelock::{CacheLock, LockOptions, MemcachedBackend, SharedBackend};

const RUNS: usize = 5;
const OPS: usize = 2000;

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates.get(rates.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let Some(urls) = std::env::var("CACHELOCK_TEST_MEMCACHED_URLS")
        .ok()
        .filter(|v| !v.trim().is_empty())
    else {
        eprintln!(
            "SKIPPED: CACHELOCK_TEST_MEMCACHED_URLS is not set; run `source <(scripts/services env)` first"
        );
        return;
    };
    let first = urls
        .trim_start_matches("memcached://")
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let backend = MemcachedBackend::connect(&first)
            .await
            .expect("connect to memcached");
        let shared: SharedBackend = Arc::new(backend);
        let pid = std::process::id();
        let get_key = format!("cachelock-bench:get:{pid}");
        let lock_key = format!("cachelock-bench:lock:{pid}");
        shared
            .set(&get_key, &[7u8; 36], Duration::from_secs(300))
            .await
            .expect("set");
        let lock = CacheLock::new(shared.clone(), lock_key, LockOptions::default()).expect("lock");

        // Warm up the connection and both code paths.
        for _ in 0..200 {
            black_box(shared.get(&get_key).await.expect("get"));
            let guard = lock.try_acquire().await.expect("acquire");
            let _ = black_box(guard.release().await.expect("release"));
        }

        let (mut gets, mut cycles) = (Vec::new(), Vec::new());
        // Interleaved, so that drift in machine load hits both alike.
        for _ in 0..RUNS {
            let start = Instant::now();
            for _ in 0..OPS {
                black_box(shared.get(&get_key).await.expect("get"));
            }
            gets.push(OPS as f64 / start.elapsed().as_secs_f64());

            let start = Instant::now();
            for _ in 0..OPS {
                let guard = lock.try_acquire().await.expect("acquire");
                let _ = black_box(guard.release().await.expect("release"));
            }
            cycles.push(OPS as f64 / start.elapsed().as_secs_f64());
        }
        shared.delete(&get_key).await.expect("delete");

        let (get, cycle) = (median(gets.clone()), median(cycles.clone()));
        let ratio = cycle / get;
        println!("memcached {first}, one task, {RUNS} runs x {OPS} ops, medians:");
        println!(
            "  raw get round trip                 {get:>10.0} ops/s   (runs: {})",
            fmt_runs(&gets)
        );
        println!(
            "  lock cycle (try_acquire + release) {cycle:>10.0} cycles/s (runs: {})",
            fmt_runs(&cycles)
        );
        println!("  ratio cycles/s : gets/s            {ratio:>10.3}   (goal >= 0.30)");
        println!(
            "  lock cycle costs                   {:>10.2} raw round trips (goal <= 3.3)",
            get / cycle
        );
        println!("  goal {}", if ratio >= 0.30 { "met" } else { "NOT met" });
    });
}

fn fmt_runs(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}
