//! The blocking facade, from plain `fn`s (no runtime) and plain threads.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachelock::{
    LockOptions, MemoizeError, MemoizeOptions, MemoryBackend, SharedBackend, Wait, blocking,
};

fn cache() -> SharedBackend {
    Arc::new(MemoryBackend::new())
}

fn key(name: &str) -> String {
    format!("blocking-test:{name}:{}", uuid::Uuid::new_v4())
}

#[test]
fn memoize_computes_once_then_hits() {
    let b = cache();
    let k = key("memoize");
    let calls = AtomicUsize::new(0);
    let o = MemoizeOptions::new().lock(LockOptions::new());
    for _ in 0..3 {
        let v: Vec<String> = blocking::memoize(&b, k.as_str(), &o, || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(vec!["a".into(), "ü".into()])
        })
        .unwrap();
        assert_eq!(v, vec!["a", "ü"]);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn memoize_compute_error_is_returned() {
    let b = cache();
    let r: Result<u8, _> =
        blocking::memoize(&b, key("err").as_str(), &MemoizeOptions::new(), || {
            Err(std::io::Error::other("nope"))
        });
    assert!(matches!(r, Err(MemoizeError::Compute(ref e)) if e.to_string() == "nope"));
}

#[test]
fn memoize_from_many_threads_computes_once() {
    let b = cache();
    let k = key("threads");
    let calls = Arc::new(AtomicUsize::new(0));
    let o =
        MemoizeOptions::new().lock(LockOptions::new().wait(Wait::Timeout(Duration::from_secs(10))));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (b, k, o, calls) = (b.clone(), k.clone(), o.clone(), calls.clone());
            std::thread::spawn(move || {
                blocking::memoize(&b, k.as_str(), &o, || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(200));
                    Ok::<_, std::io::Error>(42u32)
                })
                .unwrap()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 42);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn lock_acquire_release_and_contention() {
    let b = cache();
    let k = key("lock");
    let lock = blocking::CacheLock::new(b.clone(), k.as_str(), LockOptions::new()).unwrap();
    let guard = lock.acquire().unwrap();
    assert_eq!(guard.key(), k);
    let stored = futures_util::FutureExt::now_or_never(b.get(&k))
        .unwrap()
        .unwrap();
    assert_eq!(stored.as_deref(), Some(guard.token().as_bytes()));
    // Held: a try fails, a timed wait times out, also from another thread.
    assert!(lock.try_acquire().unwrap_err().is_held());
    let other = lock.clone();
    let waited = std::thread::spawn(move || {
        let start = Instant::now();
        let e = other
            .acquire_timeout(Duration::from_millis(200))
            .unwrap_err();
        (e.is_timed_out(), start.elapsed())
    })
    .join()
    .unwrap();
    assert!(waited.0);
    assert!(waited.1 >= Duration::from_millis(200));
    assert_eq!(guard.release().unwrap(), cachelock::Released::Released);
    let out = lock.with_lock(|| 5).unwrap();
    assert_eq!(out, 5);
    assert!(lock.try_acquire().is_ok());
}

#[test]
fn dropped_guard_is_released_in_the_background() {
    let b = cache();
    let k = key("drop");
    let lock = blocking::CacheLock::new(b.clone(), k.as_str(), LockOptions::new()).unwrap();
    drop(lock.acquire().unwrap());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if lock.try_acquire().is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the dropped guard was never released");
}

#[test]
fn memoize_iter_round_trip_and_early_drop() {
    let b = cache();
    let k = key("iter");
    let o = MemoizeOptions::new().lock(LockOptions::new());
    let items: Vec<Result<u32, std::io::Error>> = (0..10).map(Ok).collect();
    let mut it = blocking::memoize_iter(&b, k.as_str(), &o, items);
    assert_eq!(it.next().unwrap().unwrap(), 0);
    drop(it);
    // Dropped early: nothing cached, lock released (in the background).
    let again: Vec<u32> =
        blocking::memoize_iter(&b, k.as_str(), &o, (0..10).map(Ok::<u32, std::io::Error>))
            .map(Result::unwrap)
            .collect();
    assert_eq!(again, (0..10).collect::<Vec<_>>());
    let hit: Vec<u32> = blocking::memoize_iter(
        &b,
        k.as_str(),
        &o,
        Vec::<Result<u32, std::io::Error>>::new(),
    )
    .map(Result::unwrap)
    .collect();
    assert_eq!(hit, (0..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn inside_a_runtime_it_refuses_instead_of_panicking() {
    let b = cache();
    let r: Result<u8, MemoizeError<std::io::Error>> =
        blocking::memoize(&b, "k", &MemoizeOptions::new(), || Ok(1));
    assert!(matches!(r, Err(MemoizeError::Config(_))), "{r:?}");
    let lock = blocking::CacheLock::new(b, "k", LockOptions::new()).unwrap();
    assert!(lock.acquire().is_err());
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn through_real_memcached() {
    let urls = server_env("CACHELOCK_TEST_MEMCACHED_URLS");
    let b: SharedBackend = Arc::new(
        blocking::run(cachelock::MemcachedBackend::connect(&urls))
            .unwrap()
            .unwrap(),
    );
    let k = key("memcached");
    let calls = AtomicUsize::new(0);
    let o = MemoizeOptions::new()
        .lock(LockOptions::new())
        .chunk_size(4096);
    let big = "m".repeat(20_000) + &"n".repeat(20_000);
    for _ in 0..2 {
        let v: String = blocking::memoize(&b, k.as_str(), &o, || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(big.clone())
        })
        .unwrap();
        assert_eq!(v, big);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let lock = blocking::CacheLock::new(b, key("memcached-lock"), LockOptions::new()).unwrap();
    let g = lock.acquire().unwrap();
    assert!(lock.try_acquire().unwrap_err().is_held());
    assert_eq!(g.release().unwrap(), cachelock::Released::Released);
}

/// As `common::server_env` (this file does not use the shared module).
fn server_env(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{var} is not set: this test needs the test servers; run it through scripts/test"
        ),
    }
}
