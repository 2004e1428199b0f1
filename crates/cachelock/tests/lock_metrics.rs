//! The lock's `metrics`, counted exactly in one fault scenario (a waiter
//! times out, the holder's key is evicted under keep-alive, a guard is
//! dropped without release), with a local recording recorder on paused time.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cachelock::lock::metrics_names as m;
use cachelock::{CacheLock, LockOptions, MemoryBackend, Released, SharedBackend};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

/// `name{label=value}` -> counter value or histogram sample count.
fn snapshot(recorder: &DebuggingRecorder) -> BTreeMap<String, u64> {
    recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = if labels.is_empty() {
                key.name().to_owned()
            } else {
                format!("{}{{{}}}", key.name(), labels.join(","))
            };
            let n = match value {
                DebugValue::Counter(n) => n,
                DebugValue::Histogram(samples) => samples.len() as u64,
                DebugValue::Gauge(_) => panic!("no gauges expected: {name}"),
            };
            (name, n)
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[test]
fn one_fault_scenario_is_counted_exactly() {
    let recorder = DebuggingRecorder::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let b: SharedBackend = Arc::new(MemoryBackend::new());
            let key = common::unique_key("metrics");
            let opts = LockOptions::new()
                .lease(Duration::from_secs(3))
                .retry_interval(Duration::from_secs(1))
                .jitter(0.0);
            let holder = CacheLock::new(b.clone(), key.as_str(), opts.clone()).unwrap();
            let waiter = CacheLock::new(b.clone(), key.as_str(), opts.clone()).unwrap();
            let guard = holder.acquire().await.unwrap(); // 1 attempt
            guard.keep_alive();
            // Attempts at 0, again at 0 once the release wake-up is armed,
            // then at 1, 2 and 2.5 s, then a timeout; meanwhile the
            // holder renews at 1 and 2 s.
            let err = waiter
                .acquire_timeout(Duration::from_millis(2_500))
                .await
                .unwrap_err();
            assert!(err.is_timed_out());
            // Evicted: the renewal at 3 s finds it gone.
            b.delete(&key).await.unwrap();
            guard.lost().await;
            assert_eq!(guard.release().await.unwrap(), Released::Lost);
            // A guard dropped without release is released in the background.
            let other = CacheLock::new(b.clone(), format!("{key}-2"), opts).unwrap();
            drop(other.acquire().await.unwrap());
            assert!(other.close().await);
        });
    });
    let expected: BTreeMap<String, u64> = [
        (m::ACQUIRE_WAIT.to_owned(), 3),
        (m::ACQUIRED.to_owned(), 2),
        (m::ATTEMPTS.to_owned(), 7),
        (m::TIMEOUTS.to_owned(), 1),
        (format!("{}{{outcome=ok}}", m::RENEWALS), 2),
        (format!("{}{{outcome=lost}}", m::RENEWALS), 1),
        (m::LOST.to_owned(), 1),
        (format!("{}{{outcome=lost}}", m::RELEASES), 1),
        (format!("{}{{outcome=released}}", m::RELEASES), 1),
        (m::DROPPED.to_owned(), 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(snapshot(&recorder), expected);
}
