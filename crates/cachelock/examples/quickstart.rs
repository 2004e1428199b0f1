//! cachelock at work on the embedded in-memory backend (no server needed).
//!
//! Eight tasks contend for one lock. Each holds it for a short "critical
//! section"; the program checks that no two sections overlap and prints a
//! timeline, then shows a non-blocking attempt, a timed-out wait and a lost
//! lease being reported.
//!
//! Run it with `cargo run --example quickstart`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cachelock::{CacheLock, KeyBuilder, LockOptions, MemoryBackend, Released, SharedBackend};
use tokio::time::Instant;

#[tokio::main]
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
    let cache: SharedBackend = Arc::new(MemoryBackend::new());
    let key = KeyBuilder::new("quickstart").build(["report", "2026-11"]);
    let options = LockOptions::new()
        .lease(Duration::from_secs(5))
        .retry_interval(Duration::from_millis(10));
    let lock = CacheLock::new(cache.clone(), key.clone(), options)?;

    println!("cachelock quickstart: 8 tasks contend for one lock on key {key:?}");
    println!("(embedded in-memory backend; each task holds the lock for 30 ms)\n");

    let start = Instant::now();
    let inside = Arc::new(AtomicUsize::new(0));
    let mut spans = Vec::new();
    let mut tasks = Vec::new();
    for id in 0..8 {
        let (lock, inside) = (lock.clone(), inside.clone());
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
    match lock.try_acquire().await {
        Err(e) if e.is_held() => println!("  a second, non-blocking attempt while held: {e}"),
        other => println!("  unexpected: {other:?}"),
    }
    let t = Instant::now();
    match lock.acquire_timeout(Duration::from_millis(100)).await {
        Err(e) if e.is_timed_out() => println!(
            "  a waiter with a 100 ms timeout gave up after {} ms: {e}",
            t.elapsed().as_millis()
        ),
        other => println!("  unexpected: {other:?}"),
    }
    // The cache loses the key (eviction, restart): the holder finds out.
    cache.delete(&key).await?;
    println!(
        "  the cache lost the key; releasing reports: {:?}",
        guard.release().await?
    );

    if overlaps != 0 || !all_alone {
        return Err("mutual exclusion was violated".into());
    }
    Ok(())
}
