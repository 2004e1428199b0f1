//! cachelock at work on the embedded in-memory backend (no server needed).
//!
//! Part 1, the lock: eight tasks contend for one lock. Each holds it for a
//! short "critical section"; the program checks that no two sections
//! overlap and prints a timeline, then shows a non-blocking attempt, a
//! timed-out wait and a lost lease being reported.
//!
//! Part 2, a stampede: 500 callers ask for the same missing value at the
//! same moment, and computing it takes 300 ms. One of them computes it;
//! every caller gets it about 300 ms after asking; later callers get it
//! from the cache in microseconds.
//!
//! Run it with `cargo run --example quickstart`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cachelock::{Cache, LockOptions, MemoryBackend, Released};
use tokio::time::Instant;

#[tokio::main]
#[cfg_attr(test, allow(dead_code))]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Show cachelock's own warnings (set RUST_LOG=cachelock=debug for every event).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "cachelock=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    run().await
}

/// Both parts; an error if exclusion broke or the value was computed twice.
async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let cache = Cache::builder(MemoryBackend::new())
        .namespace("quickstart")
        .lock(
            LockOptions::new()
                .lease(Duration::from_secs(5))
                .retry_interval(Duration::from_millis(10)),
        )
        .build()?;
    let lock = cache.lock(("report", "2026-11"));
    let key = lock.key().to_owned();

    println!("cachelock quickstart, part 1: 8 tasks contend for one lock on key {key:?}");
    println!("(embedded in-memory backend; each task holds the lock for 30 ms)\n");

    let start = Instant::now();
    let inside = Arc::new(AtomicUsize::new(0));
    let mut spans = Vec::new();
    let mut tasks = Vec::new();
    for id in 0..8 {
        // Each task takes a lock of its own on the key (re-acquiring
        // through a lock that is already held is `AlreadyHeld`, not a wait).
        let (lock, inside) = (cache.lock(("report", "2026-11")), inside.clone());
        tasks.push(tokio::spawn(async move {
            let guard = lock.acquire().await?;
            let entered = start.elapsed();
            let others = inside.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(30)).await;
            inside.fetch_sub(1, Ordering::SeqCst);
            let left = start.elapsed();
            let outcome = guard.release().await?;
            Ok::<_, cachelock::Error>((id, entered, left, others, outcome))
        }));
    }
    for t in tasks {
        spans.push(t.await??);
    }
    spans.sort_by_key(|s| s.1);
    for (id, entered, left, others, outcome) in &spans {
        println!(
            "  task {id}: held the lock from {:>4} ms to {:>4} ms, others inside: {others}, release: {outcome:?}",
            entered.as_millis(),
            left.as_millis()
        );
    }
    let overlaps = spans.windows(2).filter(|w| w[1].1 < w[0].2).count();
    let all_alone = spans.iter().all(|s| s.3 == 0 && s.4 == Released::Released);
    println!(
        "\n  {} critical sections, {overlaps} overlaps: {}",
        spans.len(),
        if overlaps == 0 && all_alone {
            "each one was exclusive"
        } else {
            "EXCLUSION BROKEN"
        }
    );

    let guard = lock.acquire().await?;
    let other = cache.lock(("report", "2026-11"));
    match other.try_acquire().await {
        Err(e) if e.is_held() => println!("  a second, non-blocking attempt while held: {e}"),
        other => println!("  unexpected: {other:?}"),
    }
    let t = Instant::now();
    match other.acquire_timeout(Duration::from_millis(100)).await {
        Err(e) if e.is_timed_out() => println!(
            "  a waiter with a 100 ms timeout gave up after {} ms: {e}",
            t.elapsed().as_millis()
        ),
        other => println!("  unexpected: {other:?}"),
    }
    // The cache loses the key (eviction, restart): the holder finds out.
    cache.backend().delete(&key).await?;
    println!(
        "  the cache lost the key; releasing reports: {:?}",
        guard.release().await?
    );

    if overlaps != 0 || !all_alone {
        return Err("mutual exclusion was violated".into());
    }

    stampede(&cache).await?;
    cache.close().await;
    Ok(())
}

/// Part 2: 500 callers miss the same value at once; it takes 300 ms to
/// compute.
async fn stampede(cache: &Cache) -> Result<(), Box<dyn std::error::Error>> {
    const CALLERS: usize = 500;
    const COMPUTE: Duration = Duration::from_millis(300);
    println!(
        "\ncachelock quickstart, part 2: {CALLERS} callers ask for the same missing value at once; \
         computing it takes {} ms",
        COMPUTE.as_millis()
    );
    let computes = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut callers = Vec::with_capacity(CALLERS);
    for _ in 0..CALLERS {
        let (cache, computes) = (cache.clone(), computes.clone());
        callers.push(tokio::spawn(async move {
            let asked = Instant::now();
            let report: String = cache
                .get_with(("monthly-report", "2026-11"), || async move {
                    computes.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(COMPUTE).await; // the expensive part
                    "42 pages".to_string()
                })
                .await;
            (report, asked.elapsed())
        }));
    }
    let mut waits = Vec::with_capacity(CALLERS);
    for c in callers {
        let (report, waited) = c.await?;
        if report != "42 pages" {
            return Err(format!("a caller got {report:?}").into());
        }
        waits.push(waited);
    }
    waits.sort();
    let computes = computes.load(Ordering::SeqCst);
    println!(
        "  the value was computed {computes} time(s) for {CALLERS} callers; every caller had it \
         after {}–{} ms (all done {} ms after the first asked)",
        waits[0].as_millis(),
        waits[CALLERS - 1].as_millis(),
        start.elapsed().as_millis()
    );
    let t = Instant::now();
    let rounds = 10_000u32;
    for _ in 0..rounds {
        let report: String = cache
            .get_with(("monthly-report", "2026-11"), || async {
                "recomputed".to_string()
            })
            .await;
        if report != "42 pages" {
            return Err("a cached call computed again".into());
        }
    }
    println!(
        "  then {rounds} more calls found it in the cache: {:.1} µs per call, no compute",
        t.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
    );
    if computes != 1 {
        return Err(format!("computed {computes} times, not once").into());
    }
    Ok(())
}

/// `cargo test` runs the quickstart too (the README's first command), so a
/// change that breaks it fails the suite.
#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_quickstart_runs() {
        if let Err(e) = super::run().await {
            panic!("the quickstart failed: {e}");
        }
    }
}
