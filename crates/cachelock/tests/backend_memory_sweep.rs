//! The embedded backend frees expired entries under churn (issue 10,
//! item 17): keys written once with a short TTL and never read again (as
//! memoize's chunk keys are) must not pile up for the life of the process.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cachelock::{Backend, MemoryBackend};

#[tokio::test(start_paused = true)]
async fn expired_entries_are_swept_under_churn() {
    let cache = MemoryBackend::new();
    let ttl = Duration::from_millis(50);
    let mut peak = 0;
    for i in 0..100_000u32 {
        let key = format!("churn:{i}");
        cache.set(&key, b"value", ttl).await.unwrap();
        if i % 100 == 99 {
            // 100 writes a millisecond: at most ~5,000 keys are live.
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        peak = peak.max(cache.len());
    }
    // Before the fix all 100,000 entries were still stored.
    assert!(peak <= 12_000, "peak of {peak} entries for ~5,000 live");
    assert!(cache.len() <= 12_000, "{} entries left", cache.len());

    // Once everything has expired, writes keep sweeping: the count falls.
    tokio::time::advance(Duration::from_secs(1)).await;
    let before = cache.len();
    for i in 0..20_000u32 {
        cache.add(&format!("late:{i}"), b"v", ttl).await.unwrap();
    }
    let after = cache.len();
    assert!(after < before + 20_000, "{before} then {after}");
    for i in 0..20_000u32 {
        let k = format!("late:{i}");
        assert_eq!(
            cache.get(&k).await.unwrap().as_deref(),
            Some(&b"v"[..]),
            "{k}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn live_entries_are_never_swept() {
    let cache = MemoryBackend::new();
    for i in 0..5_000u32 {
        cache
            .set(&format!("keep:{i}"), b"v", Duration::from_secs(3600))
            .await
            .unwrap();
        cache
            .set(&format!("drop:{i}"), b"v", Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(2)).await;
    }
    for i in 0..5_000u32 {
        let k = format!("keep:{i}");
        assert!(cache.get(&k).await.unwrap().is_some(), "{k}");
    }
    assert!(cache.len() < 10_000, "{} entries", cache.len());
}
