//! Freshness cases (issue 12) written once over `SharedBackend`, fanned out
//! over backends by [`freshness_tests!`]: serve-stale with one refresher,
//! `OnLockFailure::ServeStale`, shared failure records and the retry
//! budget, stale-if-error, soft / namespace invalidation and fenced
//! write-back. Each handle stands for one process; each case uses its own
//! namespace (so `invalidate_all` touches no other test).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cachelock::{
    Cache, CacheBuilder, Expiration, LockOptions, MemoizeError, OnLockFailure, SharedBackend,
};
use tokio::sync::Notify;

use super::unique_key;

/// Expands every freshness case into a test for one backend (the same
/// arguments as [`memoize_tests!`](crate::memoize_tests)).
#[macro_export]
macro_rules! freshness_tests {
    ($make:expr, paused = $paused:tt $(, #[$attr:meta])*) => {
        $crate::freshness_tests!(@cases $make, $paused, [$(#[$attr])*];
            stale_served_while_one_refreshes, serve_stale_on_lock_failure,
            failure_record_reaches_other_processes, retry_budget_per_failure_window,
            stale_if_error_serves_the_old_value, soft_invalidation_serves_stale_then_refreshes,
            invalidate_all_misses_everywhere, invalidate_all_is_refused_unless_turned_on,
            fenced_write_back_never_serves_old_as_fresh, fenced_stream_write_back_never_serves_old,
            a_value_that_expired_during_the_compute_is_stored,
            a_soft_invalidation_gone_during_the_compute_still_fences,
            soft_invalidation_of_a_missing_value,
            default_policy_is_a_single_ttl, background_refresh_returns_at_once);
    };
    (@cases $make:expr, $paused:tt, $attrs:tt; $($case:ident),*) => {
        $(
            $crate::freshness_tests!(@attrs $attrs
            #[tokio::test(flavor = "current_thread", start_paused = $paused)]
            async fn $case() {
                common::logs::init();
                let backend: cachelock::SharedBackend = $make;
                common::freshness_cases::$case(backend).await;
            });
        )*
    };
    (@attrs [$(#[$attr:meta])*] $($item:tt)*) => {
        $(#[$attr])* $($item)*
    };
}

const FRESH: Duration = Duration::from_millis(300);
const WINDOW: Duration = Duration::from_secs(20);

fn builder(b: &SharedBackend, ns: &str) -> CacheBuilder {
    Cache::builder(b.clone())
        .namespace(ns)
        .lock(LockOptions::new().max_wait(Duration::from_secs(10)))
}

fn swr() -> Expiration {
    Expiration::fresh(FRESH).stale_while_revalidate(WINDOW)
}

/// A compute that counts its runs.
#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

impl Runs {
    fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct Boom;

pub async fn stale_served_while_one_refreshes(b: SharedBackend) {
    let ns = unique_key("swr");
    let p1 = builder(&b, &ns).expiration(swr()).build().unwrap();
    let p2 = builder(&b, &ns).expiration(swr()).build().unwrap();
    let runs = Runs::default();
    let r = runs.clone();
    assert_eq!(p1.get_with("k", || async move { r.bump() }).await, 1);
    tokio::time::sleep(FRESH + Duration::from_millis(100)).await;
    // The refresher: its compute waits until we let it go.
    let started = Arc::new(Notify::new());
    let go = Arc::new(Notify::new());
    let (s, g, r) = (started.clone(), go.clone(), runs.clone());
    let p = p1.clone();
    let refresher = tokio::spawn(async move {
        p.get_with("k", || async move {
            s.notify_one();
            g.notified().await;
            r.bump()
        })
        .await
    });
    started.notified().await;
    // Everyone else, in this process and the other, gets the old value at
    // once; their computes never run.
    for cache in [&p1, &p2, &p1, &p2] {
        let r = runs.clone();
        assert_eq!(cache.get_with("k", || async move { r.bump() }).await, 1);
    }
    assert_eq!(runs.get(), 1, "nobody else computed");
    go.notify_one();
    assert_eq!(refresher.await.unwrap(), 2);
    let r = runs.clone();
    assert_eq!(p2.get_with("k", || async move { r.bump() }).await, 2);
    assert_eq!(runs.get(), 2);
}

/// `try_get_with_background`: the caller that starts the refresh gets the
/// old value at once too; the refresh runs in the background, once across
/// processes, its lease kept alive past its length, and `close` waits for
/// it.
pub async fn background_refresh_returns_at_once(b: SharedBackend) {
    const LEASE: Duration = Duration::from_millis(600);
    let ns = unique_key("bg-refresh");
    let make = || {
        Cache::builder(b.clone())
            .namespace(&ns)
            .expiration(swr())
            .lock(
                LockOptions::new()
                    .lease(LEASE)
                    .max_wait(Duration::from_secs(10)),
            )
            .build()
            .unwrap()
    };
    let (p1, p2) = (make(), make());
    let runs = Runs::default();
    let r = runs.clone();
    let v = p1
        .try_get_with_background("k", || async move { Ok::<_, Boom>(r.bump()) })
        .await
        .unwrap();
    assert_eq!(v, 1);
    tokio::time::sleep(FRESH + Duration::from_millis(100)).await;
    let started = Arc::new(Notify::new());
    let go = Arc::new(Notify::new());
    let (s, g, r) = (started.clone(), go.clone(), runs.clone());
    // Its compute cannot finish before we let it go, so getting the old
    // value back proves the call did not wait for it.
    let v = p1
        .try_get_with_background("k", || async move {
            s.notify_one();
            g.notified().await;
            Ok::<_, Boom>(r.bump())
        })
        .await
        .unwrap();
    assert_eq!(v, 1, "the refresher's caller got the old value");
    started.notified().await;
    let others = |cache: &Cache| {
        let (cache, r) = (cache.clone(), runs.clone());
        async move {
            cache
                .try_get_with_background("k", || async move { Ok::<_, Boom>(r.bump()) })
                .await
                .unwrap()
        }
    };
    for cache in [&p1, &p2, &p1, &p2] {
        assert_eq!(others(cache).await, 1);
    }
    // Past the lease: kept alive, so the other process still cannot take
    // the refresh over.
    tokio::time::sleep(LEASE + LEASE / 2).await;
    assert_eq!(others(&p2).await, 1);
    assert!(p2.close().await);
    assert_eq!(runs.get(), 1, "one refresh across processes");
    go.notify_one();
    assert!(p1.close().await, "close waits for the background refresh");
    assert_eq!(runs.get(), 2);
    assert_eq!(others(&p2).await, 2);
    assert_eq!(runs.get(), 2);
}

pub async fn serve_stale_on_lock_failure(b: SharedBackend) {
    let ns = unique_key("serve-stale");
    // Past fresh there is no stale-while-revalidate window: a miss that
    // waits for the lock; the value is kept for stale-if-error.
    let policy = Expiration::fresh(FRESH).stale_if_error(WINDOW);
    let cache = builder(&b, &ns)
        .expiration(policy)
        .lock(LockOptions::new().max_wait(Duration::from_millis(200)))
        .build()
        .unwrap();
    let runs = Runs::default();
    let r = runs.clone();
    assert_eq!(cache.get_with("k", || async move { r.bump() }).await, 1);
    tokio::time::sleep(FRESH + Duration::from_millis(100)).await;
    // Another process holds the memoize lock.
    let holder = builder(&b, &ns).build().unwrap();
    let lock_key = cache.full_lock_key("k");
    let guard = cachelock::CacheLock::new(holder.backend().clone(), lock_key, LockOptions::new())
        .unwrap()
        .acquire()
        .await
        .unwrap();
    let r = runs.clone();
    let got: Result<usize, MemoizeError<Boom>> = cache
        .entry("k")
        .on_lock_failure(OnLockFailure::ServeStale)
        .or_try_insert_with(|| async move { Ok(r.bump()) })
        .await;
    assert_eq!(got.unwrap(), 1, "the stale value, no second compute");
    assert_eq!(runs.get(), 1);
    let _ = guard.release().await.unwrap();
}

pub async fn failure_record_reaches_other_processes(b: SharedBackend) {
    let ns = unique_key("fail-share");
    let make = || {
        builder(&b, &ns)
            .share_failures(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let (p1, p2) = (make(), make());
    let runs = Runs::default();
    let started = Arc::new(Notify::new());
    let (s, r) = (started.clone(), runs.clone());
    let leader = tokio::spawn(async move {
        p1.try_get_with::<u8, _, _, _>("k", || async move {
            r.bump();
            s.notify_one();
            // Long enough for the waiter to be waiting when it fails, even
            // on a loaded machine (a waiter that comes after the failure
            // is the retry budget's case, not this one).
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err(Boom)
        })
        .await
    });
    started.notified().await;
    let r = runs.clone();
    let waited: Result<u8, MemoizeError<Boom>> = p2
        .try_get_with("k", || async move {
            r.bump();
            Ok(1)
        })
        .await;
    assert!(
        matches!(waited, Err(MemoizeError::Failed { .. })),
        "{waited:?}"
    );
    assert!(leader.await.unwrap().unwrap_err().is_compute());
    assert_eq!(runs.get(), 1, "the waiter did not compute");
}

pub async fn retry_budget_per_failure_window(b: SharedBackend) {
    let ns = unique_key("fail-budget");
    let n = 2;
    let procs: Vec<Cache> = (0..3)
        .map(|_| {
            builder(&b, &ns)
                .share_failures(Duration::from_secs(10))
                .failure_retries(n)
                .build()
                .unwrap()
        })
        .collect();
    let runs = Runs::default();
    let mut failed = 0;
    let mut shared = 0;
    for i in 0..12 {
        let r = runs.clone();
        let res = procs[i % 3]
            .try_get_with::<u8, _, _, _>("k", || async move {
                r.bump();
                Err(Boom)
            })
            .await;
        match res {
            Err(MemoizeError::Compute(_)) => failed += 1,
            Err(MemoizeError::Failed { .. }) => shared += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(runs.get(), 1 + n as usize, "at most 1 + N computes");
    assert_eq!(failed, 1 + n as usize);
    assert_eq!(shared, 12 - failed);
}

pub async fn stale_if_error_serves_the_old_value(b: SharedBackend) {
    let ns = unique_key("sie");
    let cache = builder(&b, &ns)
        .expiration(Expiration::fresh(FRESH).stale_if_error(WINDOW))
        .build()
        .unwrap();
    let v: Result<u8, MemoizeError<Boom>> = cache.try_get_with("k", || async { Ok(7) }).await;
    assert_eq!(v.unwrap(), 7);
    tokio::time::sleep(FRESH + Duration::from_millis(100)).await;
    let runs = Runs::default();
    let r = runs.clone();
    let v = cache
        .try_get_with::<u8, _, _, _>("k", || async move {
            r.bump();
            Err(Boom)
        })
        .await;
    assert_eq!(v.unwrap(), 7, "stale served on error");
    assert_eq!(runs.get(), 1, "the compute was tried");
    // Without the window the error comes through.
    let plain = builder(&b, &unique_key("sie-off"))
        .expiration(FRESH + WINDOW)
        .build()
        .unwrap();
    let v = plain
        .try_get_with::<u8, _, _, _>("k", || async { Err(Boom) })
        .await;
    assert!(v.unwrap_err().is_compute());
}

pub async fn soft_invalidation_serves_stale_then_refreshes(b: SharedBackend) {
    let ns = unique_key("soft");
    let policy = Expiration::fresh(Duration::from_secs(60)).stale_while_revalidate(WINDOW);
    let p1 = builder(&b, &ns).expiration(policy).build().unwrap();
    let p2 = builder(&b, &ns).expiration(policy).build().unwrap();
    assert_eq!(p1.get_with("k", || async { 1u32 }).await, 1);
    p2.invalidate_soft("k").await.unwrap();
    // Still readable (stale), in every process.
    assert_eq!(p1.get::<u32>("k").await, Some(1));
    // The next caller refreshes (in the call) and gets the new value.
    assert_eq!(p1.get_with("k", || async { 2u32 }).await, 2);
    assert_eq!(p2.get_with("k", || async { 3u32 }).await, 2);
    // Without a stale window, a soft invalidation is a miss.
    let plain = builder(&b, &ns)
        .expiration(Duration::from_secs(60))
        .build()
        .unwrap();
    assert_eq!(plain.get_with("j", || async { 1u32 }).await, 1);
    plain.invalidate_soft("j").await.unwrap();
    assert_eq!(plain.get::<u32>("j").await, None, "a miss for every reader");
    assert_eq!(plain.get_with("j", || async { 2u32 }).await, 2);
}

pub async fn invalidate_all_misses_everywhere(b: SharedBackend) {
    let ns = unique_key("gen");
    let on = |ns: &str| builder(&b, ns).namespace_invalidation(true);
    let p1 = on(&ns).build().unwrap();
    let p2 = on(&ns).build().unwrap();
    let other = on(&unique_key("gen-other")).build().unwrap();
    for k in ["a", "b"] {
        assert_eq!(p1.get_with(k, || async { 1u8 }).await, 1);
    }
    assert_eq!(other.get_with("a", || async { 1u8 }).await, 1);
    p2.invalidate_all().await.unwrap();
    for k in ["a", "b"] {
        assert_eq!(p1.get::<u8>(k).await, None);
        assert_eq!(p1.get_with(k, || async { 2u8 }).await, 2);
        assert_eq!(p2.get_with(k, || async { 3u8 }).await, 2);
    }
    // Another namespace is untouched.
    assert_eq!(other.get_with("a", || async { 9u8 }).await, 1);
    p2.invalidate_all().await.unwrap();
    assert_eq!(p1.get_with("a", || async { 4u8 }).await, 4);
}

pub async fn invalidate_all_is_refused_unless_turned_on(b: SharedBackend) {
    let cache = builder(&b, &unique_key("gen-off")).build().unwrap();
    assert_eq!(cache.get_with("a", || async { 1u8 }).await, 1);
    match cache.invalidate_all().await {
        Err(cachelock::Error::InvalidConfig(m)) => {
            assert!(m.contains("namespace_invalidation"), "{m}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    // Nothing was invalidated.
    assert_eq!(cache.get_with("a", || async { 2u8 }).await, 1);
}

/// Soft invalidation of a key with no value (or a tombstone) leaves a
/// tombstone: a miss, and a compute that read the absence is fenced too.
pub async fn soft_invalidation_of_a_missing_value(b: SharedBackend) {
    let ns = unique_key("soft-missing");
    let cache = builder(&b, &ns).expiration(swr()).build().unwrap();
    cache.invalidate_soft("k").await.unwrap();
    assert_eq!(cache.get::<u8>("k").await, None);
    cache.invalidate_soft("k").await.unwrap();
    cache.invalidate("k").await.unwrap();
    cache.invalidate_soft("k").await.unwrap();
    assert_eq!(cache.get::<u8>("k").await, None);
    assert_eq!(cache.get_with("k", || async { 5u8 }).await, 5);
    assert_eq!(cache.get::<u8>("k").await, Some(5));
    // Marked twice: still stale, still served in the window.
    cache.invalidate_soft("k").await.unwrap();
    cache.invalidate_soft("k").await.unwrap();
    assert_eq!(cache.get::<u8>("k").await, Some(5));
    assert_eq!(cache.get_with("k", || async { 6u8 }).await, 6);
    assert_eq!(cache.get_with("k", || async { 7u8 }).await, 6);
}

pub async fn fenced_write_back_never_serves_old_as_fresh(b: SharedBackend) {
    let ns = unique_key("fence");
    let p1 = builder(&b, &ns).expiration(swr()).build().unwrap();
    let p2 = builder(&b, &ns).expiration(swr()).build().unwrap();
    let trials = 1000;
    let mut old_as_fresh = 0;
    for i in 0..trials {
        let key = format!("k{}", i % 50);
        let started = Arc::new(Notify::new());
        let go = Arc::new(Notify::new());
        let (s, g) = (started.clone(), go.clone());
        let p = p1.clone();
        let k = key.clone();
        // A slow compute of the old value, forced so it always runs.
        let slow = tokio::spawn(async move {
            let r: Result<String, MemoizeError<Boom>> = p
                .entry(k.as_str())
                .force_overwrite(true)
                .or_try_insert_with(|| async move {
                    s.notify_one();
                    g.notified().await;
                    Ok("old".to_string())
                })
                .await;
            r
        });
        started.notified().await;
        if i % 2 == 0 {
            p2.invalidate(key.as_str()).await.unwrap();
        } else {
            p2.invalidate_soft(key.as_str()).await.unwrap();
        }
        go.notify_one();
        assert_eq!(slow.await.unwrap().unwrap(), "old");
        // A reader after the invalidation: whatever it is served fresh must
        // be new.
        let got = p2
            .get_with(key.as_str(), || async { "new".to_string() })
            .await;
        if got == "old" {
            old_as_fresh += 1;
        }
    }
    assert_eq!(old_as_fresh, 0, "old values served as fresh");
}

/// The stream form of the fenced write-back: a producer that started
/// before an invalidation (forced, or after a miss; inline and chunked)
/// does not store its old items, so the next reader gets new ones.
pub async fn fenced_stream_write_back_never_serves_old(b: SharedBackend) {
    use futures_util::StreamExt;
    let ns = unique_key("fence-stream");
    // The chunks of the first process's (refused) writes are recorded.
    let w = super::memoize_cases::Wrap::new(b.clone());
    let p1 = builder(&w.shared(), &ns).chunk_size(256).build().unwrap();
    let p2 = builder(&b, &ns).chunk_size(256).build().unwrap();
    let trials = 40;
    let mut old_served = 0;
    for i in 0..trials {
        let forced = i % 2 == 0;
        let key = if forced {
            format!("s{}", i % 8)
        } else {
            format!("u{i}")
        };
        let old = if i % 4 < 2 {
            "old".to_string()
        } else {
            "o".repeat(600)
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<String, Boom>>();
        let producer =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|v| (v, rx)) },
            );
        let mut s = p1
            .entry(key.as_str())
            .force_overwrite(forced)
            .stream_with(producer);
        tx.send(Ok(old.clone())).unwrap();
        // The producer runs: the read it writes over came before.
        assert_eq!(s.next().await.unwrap().unwrap(), old);
        if i % 4 == 0 || i % 4 == 3 {
            p2.invalidate(key.as_str()).await.unwrap();
        } else {
            p2.invalidate_soft(key.as_str()).await.unwrap();
        }
        drop(tx);
        assert!(s.next().await.is_none());
        let got: Vec<String> = p2
            .stream_with(
                key.as_str(),
                futures_util::stream::iter([Ok::<_, Boom>("new".to_string())]),
            )
            .map(Result::unwrap)
            .collect()
            .await;
        if got != ["new"] {
            old_served += 1;
        }
    }
    assert_eq!(old_served, 0, "old streams served after an invalidation");
    // A refused write leaves no chunks behind.
    let chunks = w.chunk_keys();
    assert!(!chunks.is_empty());
    for k in &chunks {
        assert_eq!(b.get(k).await.unwrap(), None, "chunk {k} left behind");
    }
}

/// The fence refuses a write over an invalidation, not over a value that
/// expired while the compute ran: a cache whose TTLs are coarse
/// (Memcached's whole seconds) still holds a value past its hard end for a
/// while, and it may be gone by the write.
pub async fn a_value_that_expired_during_the_compute_is_stored(b: SharedBackend) {
    let ns = unique_key("expired-meanwhile");
    // Not a single TTL, so that the embedded backend (whose expiry is
    // exact) reads the clock too.
    let policy =
        Expiration::fresh(Duration::from_millis(500)).stale_if_error(Duration::from_millis(500));
    let short = builder(&b, &ns).expiration(policy).build().unwrap();
    let cache = builder(&b, &ns).build().unwrap();
    assert_eq!(short.get_with("k", || async { 1u32 }).await, 1);
    // Kept past its hard end, as a coarse TTL does.
    let full = cache.full_key("k");
    let raw = b.get(&full).await.unwrap().unwrap();
    b.set(&full, &raw, Duration::from_secs(60)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let got = cache
        .get_with("k", || async {
            // ... and then it expires.
            b.delete(&full).await.unwrap();
            2u32
        })
        .await;
    assert_eq!(got, 2);
    assert_eq!(
        cache.get::<u32>("k").await,
        Some(2),
        "the new value was stored"
    );
}

/// A soft invalidation whose mark goes away during the compute (its item's
/// TTL ended) still fences a compute that started before it.
pub async fn a_soft_invalidation_gone_during_the_compute_still_fences(b: SharedBackend) {
    let ns = unique_key("mark-gone");
    let p1 = builder(&b, &ns).expiration(swr()).build().unwrap();
    let p2 = builder(&b, &ns).expiration(swr()).build().unwrap();
    assert_eq!(p1.get_with("k", || async { 1u32 }).await, 1);
    let full = p1.full_key("k");
    let r: Result<u32, MemoizeError<Boom>> = p1
        .entry("k")
        .force_overwrite(true)
        .or_try_insert_with(|| async {
            p2.invalidate_soft("k").await.unwrap();
            b.delete(&full).await.unwrap();
            Ok(2)
        })
        .await;
    assert_eq!(r.unwrap(), 2);
    assert_eq!(
        p2.get_with("k", || async { 3u32 }).await,
        3,
        "a value computed before the invalidation was stored"
    );
}

pub async fn default_policy_is_a_single_ttl(b: SharedBackend) {
    let cache = builder(&b, &unique_key("default")).build().unwrap();
    assert_eq!(
        cache.expiration_policy(),
        Expiration::fresh(cachelock::memoize::DEFAULT_EXPIRATION)
    );
    let runs = Runs::default();
    for _ in 0..3 {
        let r = runs.clone();
        assert_eq!(cache.get_with("k", || async move { r.bump() }).await, 1);
    }
    assert_eq!(runs.get(), 1);
    // A policy out of range is refused.
    let bad = builder(&b, "x")
        .expiration(Expiration::fresh(FRESH).early_refresh(0.0))
        .build();
    assert!(matches!(bad, Err(cachelock::Error::InvalidConfig(_))));
}
