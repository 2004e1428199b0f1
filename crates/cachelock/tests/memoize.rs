//! memoize on the embedded backend (paused time), plus property tests of
//! the stored format against arbitrary cache contents.
#![allow(clippy::unwrap_used)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use cachelock::{MemoryBackend, SharedBackend};
use common::memoize_cases::{Counter, Never, Op, Wrap, mz};
use common::opts::{Opts, memoize};
use proptest::prelude::*;

memoize_tests!(
    Arc::new(MemoryBackend::new()) as SharedBackend,
    paused = true
);

mod freshness {
    use super::common;
    use crate::freshness_tests;
    freshness_tests!(
        std::sync::Arc::new(cachelock::MemoryBackend::new()) as cachelock::SharedBackend,
        paused = true
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// Stores `value` under a fresh key with `o` and returns the backend, the
/// key and the chunk keys written.
async fn stored(o: &Opts, value: &str) -> (SharedBackend, String, Vec<String>) {
    let w = Wrap::new(Arc::new(MemoryBackend::new()));
    let b = w.shared();
    let k = common::unique_key("prop");
    mz(&b, &k, o, &Counter::default(), value.to_string()).await;
    let chunks = w.chunk_keys();
    (w.inner.clone(), k, chunks)
}

fn options(chunked: bool, compressed: bool, encrypted: bool) -> Opts {
    let mut o = Opts::new().compression(compressed);
    if chunked {
        o = o.chunk_size(256);
    }
    if encrypted {
        o = o.encryption_key(b"0123456789abcdef");
    }
    o
}

/// Reads `k` with memoize whose compute returns `fallback`: whatever the
/// cache holds, the result must be the stored value or the fallback,
/// never anything else, and must not panic.
async fn read_back(b: &SharedBackend, k: &str, o: &Opts, fallback: &str) -> String {
    let f = fallback.to_string();
    memoize(b, k, o, || async move { Ok::<_, Never>(f) })
        .await
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn arbitrary_bytes_under_the_key_never_decode_wrong(
        junk in proptest::collection::vec(any::<u8>(), 0..600),
        keep_header in any::<bool>(),
        chunked in any::<bool>(),
        compressed in any::<bool>(),
        encrypted in any::<bool>(),
    ) {
        runtime().block_on(async {
            let o = options(chunked, compressed, encrypted);
            let value = "value ".repeat(120);
            let (b, k, _) = stored(&o, &value).await;
            let full = o.full_key(&k.as_str().into());
            let mut bytes = junk.clone();
            if keep_header {
                // Start like a real item, so parsing goes deeper.
                let real = b.get(&full).await.unwrap().unwrap();
                let n = real.len().min(5).min(bytes.len());
                bytes[..n].copy_from_slice(&real[..n]);
            }
            b.set(&full, &bytes, Duration::from_secs(60)).await.unwrap();
            let got = read_back(&b, &k, &o, "fallback").await;
            prop_assert_eq!(got, "fallback");
            Ok(())
        })?;
    }

    #[test]
    fn corrupted_stored_items_never_decode_wrong(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        target_chunk in any::<bool>(),
        chunk_pick in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        compressed in any::<bool>(),
        encrypted in any::<bool>(),
    ) {
        runtime().block_on(async {
            let o = options(true, compressed, encrypted);
            // Incompressible, so that it is chunked in every codec.
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            let value: String = (0..900)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from(b'!' + (x % 90) as u8)
                })
                .collect();
            let (b, k, chunks) = stored(&o, &value).await;
            let full = o.full_key(&k.as_str().into());
            let target = if target_chunk { chunk_pick.get(&chunks).clone() } else { full };
            let mut bytes = b.get(&target).await.unwrap().unwrap().to_vec();
            for (at, x) in &flips {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            if truncate {
                bytes.truncate(bytes.len() / 2);
            }
            b.set(&target, &bytes, Duration::from_secs(60)).await.unwrap();
            let got = read_back(&b, &k, &o, "fallback").await;
            prop_assert_eq!(got, "fallback");
            // And it was rebuilt: the next read is a hit of the fallback.
            prop_assert_eq!(read_back(&b, &k, &o, "other").await, "fallback");
            Ok(())
        })?;
    }

    #[test]
    fn chunks_swapped_between_writes_are_refused(seed in any::<u8>()) {
        runtime().block_on(async {
            // Two writes of different values; graft a chunk of the second
            // under the first's chunk key.
            let o = options(true, false, false);
            let a = format!("{seed}a").repeat(200);
            let (b, k, chunks_a) = stored(&o, &a).await;
            let w = Wrap::new(b.clone());
            let k2 = common::unique_key("prop2");
            mz(&w.shared(), &k2, &o, &Counter::default(), format!("{seed}b").repeat(200)).await;
            let chunks_b = w.chunk_keys();
            let foreign = b.get(&chunks_b[0]).await.unwrap().unwrap();
            b.set(&chunks_a[0], &foreign, Duration::from_secs(60)).await.unwrap();
            prop_assert_eq!(read_back(&b, &k, &o, "fallback").await, "fallback");
            Ok(())
        })?;
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn lease_is_extended_after_each_chunk_batch() {
    let w = Wrap::new(Arc::new(MemoryBackend::new()));
    let b = w.shared();
    let k = common::unique_key("extend");
    // 20 MB of incompressible-ish data in 1 MB chunks: three set_many batches.
    let value: Vec<u64> = (0..2_500_000u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let o = Opts::new()
        .compression(false)
        .lock(cachelock::LockOptions::new());
    let got = memoize(&b, k.as_str(), &o, || async {
        Ok::<_, Never>(value.clone())
    })
    .await
    .unwrap();
    assert_eq!(got.len(), value.len());
    let ops = w.ops();
    let batches = ops.iter().filter(|op| matches!(op, Op::SetMany(_))).count();
    let extends = ops
        .iter()
        .filter(|op| matches!(op, Op::ExtendIfEq(_)))
        .count();
    assert!(batches >= 2, "{batches}");
    assert_eq!(extends, batches, "one lease extension per batch");
    // Manifest last, after every chunk batch.
    let last_set = ops
        .iter()
        .rposition(|op| matches!(op, Op::Set(key, _) if *key == k))
        .unwrap();
    let last_batch = ops
        .iter()
        .rposition(|op| matches!(op, Op::SetMany(_)))
        .unwrap();
    assert!(last_set > last_batch);
    w.clear();
    let again: Vec<u64> = memoize(&b, k.as_str(), &o, || async { Ok::<_, Never>(vec![]) })
        .await
        .unwrap();
    assert_eq!(again, value);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn lost_lease_while_writing_is_logged_and_write_goes_on() {
    let w = Wrap::new(Arc::new(MemoryBackend::new()));
    let b = w.shared();
    let k = common::unique_key("lost-lease");
    let o = Opts::new()
        .compression(false)
        .lock(cachelock::LockOptions::new());
    let lock_key = o.full_lock_key(&k.as_str().into());
    let logs = common::memoize_cases::Logs::capture();
    let value: Vec<u64> = (0..2_500_000u64).collect();
    let got = memoize(&b, k.as_str(), &o, || {
        let (b, lock_key, value) = (b.clone(), lock_key.clone(), value.clone());
        async move {
            // The lock falls out of the cache during compute.
            b.delete(&lock_key).await.unwrap();
            Ok::<_, Never>(value)
        }
    })
    .await
    .unwrap();
    assert_eq!(got.len(), value.len());
    let text = logs.text();
    assert!(text.contains("could not extend the memoize lock"), "{text}");
    let again: Vec<u64> = memoize(&b, k.as_str(), &o, || async { Ok::<_, Never>(vec![]) })
        .await
        .unwrap();
    assert_eq!(again, value, "the value was still written");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn chunks_outlive_the_manifest() {
    let b: SharedBackend = Arc::new(MemoryBackend::new());
    let w = Wrap::new(b.clone());
    let k = common::unique_key("ttl");
    let o = Opts::new()
        .chunk_size(256)
        .expiration(Duration::from_secs(100));
    mz(&w.shared(), &k, &o, &Counter::default(), "t".repeat(1_000)).await;
    let manifest_ttl = b.ttl(&k).await.unwrap().unwrap();
    for c in w.chunk_keys() {
        assert!(b.ttl(&c).await.unwrap().unwrap() > manifest_ttl);
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn invalid_options_are_refused() {
    use cachelock::LockOptions;
    let b: SharedBackend = Arc::new(MemoryBackend::new());
    // Checked once, by build(); Duration::MAX anywhere is refused, never a
    // panic (issue 10, item 9).
    for o in [
        Opts::new().chunk_size(10),
        Opts::new().expiration(Duration::ZERO),
        Opts::new().expiration(Duration::MAX),
        Opts::new().poll_interval(Duration::MAX),
        Opts::new().poll_jitter(2.0),
        Opts::new().lock(LockOptions::new().lease(Duration::ZERO)),
        Opts::new().lock(LockOptions::new().lease(Duration::MAX)),
        Opts::new().lock(LockOptions::new().max_wait(Duration::MAX)),
        Opts::new().lock(LockOptions::new().retry_interval(Duration::MAX)),
    ] {
        let r = o.builder(&b).build();
        assert!(
            matches!(r, Err(cachelock::Error::InvalidConfig(_))),
            "{r:?}"
        );
    }
    // Per call: a typed error, nothing stored.
    let cache = Opts::new().on(&b);
    let r = cache
        .entry("k")
        .expiration(Duration::MAX)
        .or_try_insert_with(|| async { Ok::<_, Never>(1u8) })
        .await;
    assert!(
        matches!(r, Err(cachelock::MemoizeError::Config(_))),
        "{r:?}"
    );
    assert_eq!(cache.get::<u8>("k").await, None);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn waiters_share_the_leaders_lock_timeout() {
    use cachelock::{CacheLock, LockOptions, MemoizeError, OnLockFailure};
    let b: SharedBackend = Arc::new(MemoryBackend::new());
    let k = common::unique_key("flight-timeout");
    let o = Opts::new()
        .lock(LockOptions::new().max_wait(Duration::from_millis(200)))
        .on_lock_failure(OnLockFailure::Fail);
    let held = CacheLock::new(
        b.clone(),
        o.full_lock_key(&k.as_str().into()),
        LockOptions::new(),
    )
    .unwrap()
    .acquire()
    .await
    .unwrap();
    let start = tokio::time::Instant::now();
    let calls = (0..10).map(|_| {
        let (b, k, o) = (b.clone(), k.clone(), o.clone());
        async move { memoize(&b, k.as_str(), &o, || async { Ok::<_, Never>(1u8) }).await }
    });
    let results = futures_util::future::join_all(calls).await;
    for r in &results {
        assert!(
            matches!(r, Err(MemoizeError::Lock(e)) if e.is_timed_out()),
            "{r:?}"
        );
    }
    // Not ten timeouts one after another.
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
    let _ = held.release().await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn waiters_do_not_queue_behind_failing_computes() {
    let b: SharedBackend = Arc::new(MemoryBackend::new());
    let k = common::unique_key("flight-error");
    let o = Opts::new();
    let c = Counter::default();
    let start = tokio::time::Instant::now();
    let calls = (0..10).map(|_| {
        let (b, k, o, c) = (b.clone(), k.clone(), o.clone(), c.clone());
        async move {
            memoize(&b, k.as_str(), &o, || async move {
                c.hit();
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err::<u8, _>(std::io::Error::other("down"))
            })
            .await
        }
    });
    let results = futures_util::future::join_all(calls).await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(e) if e.is_compute()))
    );
    assert!(
        start.elapsed() < Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    assert!(c.get() <= 10);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_waiter_takes_over_from_a_dropped_leader() {
    let b: SharedBackend = Arc::new(MemoryBackend::new());
    let k = common::unique_key("flight-drop");
    let o = Opts::new();
    let leader = {
        let (b, k, o) = (b.clone(), k.clone(), o.clone());
        tokio::spawn(async move {
            memoize(&b, k.as_str(), &o, || async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok::<_, Never>(1u8)
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let c = Counter::default();
    let follower = {
        let (b, k, o, c) = (b.clone(), k.clone(), o.clone(), c.clone());
        tokio::spawn(async move { mz(&b, &k, &o, &c, 2u8).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(c.get(), 0, "the follower waits for the leader");
    leader.abort();
    assert_eq!(follower.await.unwrap(), 2);
    assert_eq!(c.get(), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn single_flight_can_be_turned_off() {
    for (lock, computes) in [(false, 8), (true, 1)] {
        let b: SharedBackend = Arc::new(MemoryBackend::new());
        let k = common::unique_key("no-flight");
        let mut o = Opts::new().single_flight(false);
        if lock {
            o = o.lock(cachelock::LockOptions::new());
        }
        let c = Counter::default();
        let calls = (0..8).map(|_| {
            let (b, k, o, c) = (b.clone(), k.clone(), o.clone(), c.clone());
            async move {
                memoize(&b, k.as_str(), &o, || async move {
                    c.hit();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, Never>(5u8)
                })
                .await
                .unwrap()
            }
        });
        let results = futures_util::future::join_all(calls).await;
        assert!(results.iter().all(|v| *v == 5));
        assert_eq!(c.get(), computes, "lock = {lock}");
    }
}

/// XFetch on paused time with seeded RNGs: the mean time left before
/// expiry at which the early refresh fires matches the paper's rule
/// `p = exp(-t_left / (β·Δ))` applied at each read, within 10 %.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn xfetch_early_refresh_times_match_the_rule() {
    use cachelock::{Cache, Expiration};
    const FRESH_MS: u64 = 10_000;
    const DELTA_MS: u64 = 1_000;
    const READ_EVERY_MS: u64 = 50;
    let beta = 1.0;
    // Expected t_left at the first trigger (reads at t_left = FRESH - k·step).
    let mut survive = 1.0;
    let mut expected = 0.0;
    let mut t = FRESH_MS;
    while t >= READ_EVERY_MS {
        t -= READ_EVERY_MS;
        let p = (-(t as f64) / (beta * DELTA_MS as f64)).exp();
        expected += survive * p * t as f64;
        survive *= 1.0 - p;
    }
    let trials = 300;
    let mut sum = 0.0;
    for seed in 0..trials {
        let cache = Cache::builder(MemoryBackend::new())
            .expiration(
                Expiration::fresh(Duration::from_millis(FRESH_MS))
                    .stale_while_revalidate(Duration::from_secs(60))
                    .early_refresh(beta),
            )
            .rng_seed(seed)
            .build()
            .unwrap();
        cache
            .get_with("k", || async {
                tokio::time::sleep(Duration::from_millis(DELTA_MS)).await;
                1u32
            })
            .await;
        let filled = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(READ_EVERY_MS)).await;
            let at = tokio::time::Instant::now();
            let refreshed = std::sync::atomic::AtomicBool::new(false);
            cache
                .get_with("k", || async {
                    refreshed.store(true, std::sync::atomic::Ordering::SeqCst);
                    2u32
                })
                .await;
            if refreshed.load(std::sync::atomic::Ordering::SeqCst) {
                let elapsed = at.duration_since(filled).as_millis() as f64;
                sum += FRESH_MS as f64 - elapsed;
                break;
            }
            assert!(at.duration_since(filled) < Duration::from_millis(FRESH_MS + 1000));
        }
    }
    let mean = sum / trials as f64;
    assert!(
        (mean - expected).abs() < expected * 0.10,
        "mean t_left {mean:.0} ms, expected {expected:.0} ms"
    );
}
