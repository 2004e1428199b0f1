//! The `Cache` handle on the embedded backend (paused time): what it
//! accepts, its keys, its single flight, its per-call settings, its
//! background work, and durations that must never panic.
#![allow(clippy::unwrap_used)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use cachelock::{
    Cache, CacheKey, Error, KeyBuilder, LockOptions, MemoizeError, MemoryBackend, OnLockFailure,
    Released, SharedBackend,
};
use common::memoize_cases::Counter;
use common::unique_key;

#[test]
fn builder_takes_a_backend_an_arc_or_a_shared_backend() {
    let by_value = Cache::builder(MemoryBackend::new()).build().unwrap();
    let by_arc = Cache::builder(Arc::new(MemoryBackend::new()))
        .build()
        .unwrap();
    let shared: SharedBackend = Arc::new(MemoryBackend::new());
    let by_shared = Cache::builder(shared.clone()).build().unwrap();
    assert!(Arc::ptr_eq(by_shared.backend(), &shared));
    for c in [by_value, by_arc, by_shared] {
        assert_eq!(c.namespace(), "cachelock");
        assert_eq!(c.expiration(), cachelock::memoize::DEFAULT_EXPIRATION);
    }
}

#[tokio::test(start_paused = true)]
async fn connect_names_the_backend_by_url() {
    let c = Cache::connect("memory://").await.unwrap();
    assert_eq!(c.get_with("k", || async { 3u8 }).await, 3);
    assert!(Cache::connect("nope://").await.is_err());
}

/// The library's default namespace is the CLI's, so `cachelock status
/// report` finds `cache.lock("report")` (the CLI side is tested in
/// cachelock-cli's library_interop).
#[test]
fn default_namespace_is_the_clis() {
    let c = Cache::builder(MemoryBackend::new()).build().unwrap();
    assert_eq!(c.lock("report").key(), "cachelock:report");
    assert_eq!(
        c.full_key("report"),
        KeyBuilder::new("cachelock").build("report")
    );
    let bare = Cache::builder(MemoryBackend::new())
        .namespace("")
        .build()
        .unwrap();
    assert_eq!(bare.lock("report").key(), "report");
}

#[test]
fn tuple_keys_of_strings_integers_and_display() {
    let c = Cache::builder(MemoryBackend::new())
        .namespace("app")
        .build()
        .unwrap();
    let name = String::from("ann:b");
    let id = 42u64;
    assert_eq!(c.full_key(("user", id)), "app:user:42");
    assert_eq!(c.full_key(("user", &name)), "app:user:ann%3Ab");
    assert_eq!(c.full_key(("user", name.clone())), "app:user:ann%3Ab");
    assert_eq!(c.full_key(("a", "b", "c")), "app:a:b:c");
    assert_eq!(c.full_key((-1i32, 'x', 2.5f64)), "app:-1:x:2.5");
    assert_eq!(
        c.full_key((1, 2, 3, 4, 5, 6, 7, "8%")),
        "app:1:2:3:4:5:6:7:8%25"
    );
    // Escaped as parts: a tuple never collides with a plain key.
    assert_ne!(c.full_key(("a", "b")), c.full_key(("a:b",)));
    assert_eq!(
        CacheKey::from(("a", 1)),
        CacheKey::Parts(vec!["a".into(), "1".into()])
    );
}

#[tokio::test(start_paused = true)]
async fn get_invalidate_and_per_call_expiration() {
    let c = Cache::builder(MemoryBackend::new()).build().unwrap();
    let k = unique_key("entry");
    assert_eq!(c.get::<u32>(k.as_str()).await, None);
    let v: u32 = c
        .entry(k.as_str())
        .expiration(Duration::from_secs(5))
        .or_try_insert_with(|| async { Ok::<_, std::io::Error>(1) })
        .await
        .unwrap();
    assert_eq!(v, 1);
    assert_eq!(c.get::<u32>(k.as_str()).await, Some(1));
    assert_eq!(
        c.get::<String>(k.as_str()).await,
        None,
        "another type is a miss"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(c.get::<u32>(k.as_str()).await, None, "expired after 5 s");
    assert_eq!(c.get_with(k.as_str(), || async { 2u32 }).await, 2);
    c.invalidate(k.as_str()).await.unwrap();
    assert_eq!(c.get::<u32>(k.as_str()).await, None);
}

/// The failure of a leader that said `Fail` is not handed to a follower
/// that said `ComputeAnyway`: the follower computes (issue 9; the old
/// process-wide flight gave it the leader's `Err(Lock)`).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_follower_is_not_failed_by_the_leaders_options() {
    let b: SharedBackend = Arc::new(MemoryBackend::new());
    let c = Cache::builder(b.clone())
        .lock(LockOptions::new().max_wait(Duration::from_millis(200)))
        .build()
        .unwrap();
    let k = unique_key("flight-options");
    let held = cachelock::CacheLock::new(b, c.full_lock_key(k.as_str()), LockOptions::new())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let n = Counter::default();
    let leader = c
        .entry(k.as_str())
        .on_lock_failure(OnLockFailure::Fail)
        .or_try_insert_with(|| async { Ok::<_, std::io::Error>(1u8) });
    let follower = c
        .entry(k.as_str())
        .on_lock_failure(OnLockFailure::ComputeAnyway)
        .or_try_insert_with(|| async {
            n.hit();
            Ok::<_, std::io::Error>(2u8)
        });
    let (l, f) = tokio::join!(leader, follower);
    assert!(
        matches!(l, Err(MemoizeError::Lock(ref e)) if e.is_timed_out()),
        "{l:?}"
    );
    assert_eq!(f.unwrap(), 2, "the follower computed, as it asked");
    assert_eq!(n.get(), 1);
    let _ = held.release().await;
}

/// The flight map: a caller asking for another type on the same key does
/// not wait for (or decode) a leader of another type, and when the leader
/// is cancelled a follower of its type takes over.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn flights_are_per_value_type_and_survive_a_cancelled_leader() {
    let c = Cache::builder(MemoryBackend::new())
        .lock_on_miss(false)
        .build()
        .unwrap();
    let k = unique_key("flight-types");
    let leader = tokio::spawn({
        let (c, k) = (c.clone(), k.clone());
        async move {
            c.get_with(k.as_str(), || async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "never".to_string()
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let n = Counter::default();
    let follower = tokio::spawn({
        let (c, k, n) = (c.clone(), k.clone(), n.clone());
        async move {
            c.get_with(k.as_str(), || async move {
                n.hit();
                "taken over".to_string()
            })
            .await
        }
    });
    // Another type on the same key: its own attempt, served at once.
    let start = tokio::time::Instant::now();
    let other: u64 = c.get_with(k.as_str(), || async { 5 }).await;
    assert_eq!(other, 5);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(n.get(), 0, "the follower waits for its leader");
    leader.abort();
    assert_eq!(follower.await.unwrap(), "taken over");
    assert_eq!(n.get(), 1);
}

/// Background releases are tracked by the handle: `close` waits for them
/// (issue 10, item 7, the library half).
#[tokio::test(flavor = "current_thread")]
async fn close_waits_for_background_releases() {
    let b: SharedBackend = Arc::new(MemoryBackend::new());
    let c = Cache::builder(b.clone()).build().unwrap();
    let lock = c.lock(unique_key("close"));
    drop(lock.acquire().await.unwrap());
    // The release runs in a spawned task; close waits for it.
    assert!(c.close().await);
    assert_eq!(b.get(lock.key()).await.unwrap(), None);
    // An acquire cancelled while its add is in flight is cleaned up (in
    // the background) before close returns.
    let w = common::memoize_cases::Wrap::new(b.clone());
    w.yield_first
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let slow = Cache::builder(w.clone()).build().unwrap();
    let lock = slow.lock(unique_key("close-add"));
    tokio::select! {
        biased;
        _ = lock.acquire() => panic!("the add yields first"),
        _ = std::future::ready(()) => {}
    }
    assert!(slow.close().await);
    let deletes = w.count(|op| matches!(op, common::memoize_cases::Op::DeleteIfEq(_)));
    assert_eq!(deletes, 1, "{:?}", w.ops());
}

/// No Duration given to a method panics (issue 10, item 9): a per-call
/// timeout too long to represent waits without limit; a lease too long is
/// refused before anything is sent.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn duration_max_never_panics() {
    let c = Cache::builder(MemoryBackend::new()).build().unwrap();
    let k = unique_key("max");
    let lock = c.lock(k.as_str());
    let mut g = lock.acquire_timeout(Duration::MAX).await.unwrap();
    assert!(g.remaining() <= Duration::from_secs(30));
    let e = g.extend(Some(Duration::MAX)).await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)), "{e:?}");
    assert!(!g.is_lost());
    // Held: a Duration::MAX timeout keeps waiting (it does not overflow).
    // (Another CacheLock: this one would fail at once, issue 11.)
    let waiter = tokio::spawn({
        let lock = c.lock(k.as_str());
        async move {
            lock.acquire_timeout(Duration::MAX)
                .await
                .map(|g| g.forget())
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiter.is_finished());
    assert_eq!(g.release().await.unwrap(), Released::Released);
    waiter.await.unwrap().unwrap();
    for bad in [
        Cache::builder(MemoryBackend::new())
            .expiration(Duration::MAX)
            .build(),
        Cache::builder(MemoryBackend::new())
            .poll_interval(Duration::MAX)
            .build(),
        Cache::builder(MemoryBackend::new())
            .lock(LockOptions::new().lease(Duration::MAX))
            .build(),
        Cache::builder(MemoryBackend::new())
            .lock(LockOptions::new().retry_interval(Duration::MAX))
            .build(),
        Cache::builder(MemoryBackend::new())
            .lock(LockOptions::new().max_wait(Duration::MAX))
            .build(),
    ] {
        let e = bad.unwrap_err();
        assert!(e.to_string().contains("365 days"), "{e}");
    }
    // The largest accepted values work.
    let max = Cache::builder(MemoryBackend::new())
        .expiration(cachelock::MAX_DURATION)
        .lock(
            LockOptions::new()
                .lease(cachelock::MAX_DURATION)
                .retry_interval(cachelock::MAX_DURATION)
                .max_wait(cachelock::MAX_DURATION),
        )
        .build()
        .unwrap();
    assert_eq!(max.get_with("k", || async { 1u8 }).await, 1);
    let g = max.lock("another-key").try_acquire().await.unwrap();
    assert_eq!(g.release().await.unwrap(), Released::Released);
}

#[test]
fn compute_errors_say_what_went_wrong() {
    let e: MemoizeError<std::io::Error> = MemoizeError::Compute(std::io::Error::other("db down"));
    assert_eq!(e.to_string(), "computing the value failed: db down");
}

/// A follower re-joins after a leader is cancelled, but not forever: after
/// 8 cancelled leaders in a row it goes on alone and computes.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retries_after_cancelled_leaders_are_capped() {
    use std::pin::pin;
    use std::task::Poll;
    let c = Cache::builder(MemoryBackend::new())
        .lock_on_miss(false)
        .build()
        .unwrap();
    let k = unique_key("flight-cap");
    let stuck = || {
        c.get_with(k.as_str(), || async {
            std::future::pending::<()>().await;
            0u32
        })
    };
    let n = Counter::default();
    let mut follower = pin!(c.get_with(k.as_str(), || async {
        n.hit();
        7u32
    }));
    let mut leader = Box::pin(stuck());
    assert!(futures_util::poll!(leader.as_mut()).is_pending());
    assert!(futures_util::poll!(follower.as_mut()).is_pending());
    for cancelled in 1..=8 {
        drop(leader);
        // A new leader gets in before the follower looks again.
        leader = Box::pin(stuck());
        assert!(futures_util::poll!(leader.as_mut()).is_pending());
        assert!(
            futures_util::poll!(follower.as_mut()).is_pending(),
            "still following after {cancelled} cancelled leaders"
        );
        assert_eq!(n.get(), 0);
    }
    drop(leader);
    leader = Box::pin(stuck());
    assert!(futures_util::poll!(leader.as_mut()).is_pending());
    assert_eq!(futures_util::poll!(follower.as_mut()), Poll::Ready(7));
    assert_eq!(n.get(), 1, "it went on alone");
}
