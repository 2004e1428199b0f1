//! The blocking facade, from plain `fn`s (no runtime), plain threads and
//! `spawn_blocking`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachelock::{Cache, LockOptions, MemoizeError, MemoryBackend, SharedBackend, blocking};

fn backend() -> SharedBackend {
    Arc::new(MemoryBackend::new())
}

fn cache(b: &SharedBackend, lock: LockOptions) -> blocking::Cache {
    Cache::builder(b.clone())
        .lock(lock)
        .build()
        .unwrap()
        .blocking()
}

fn key(name: &str) -> String {
    format!("blocking-test:{name}:{}", uuid::Uuid::new_v4())
}

#[test]
fn memoize_computes_once_then_hits() {
    let c = cache(&backend(), LockOptions::new());
    let k = key("memoize");
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        let v: Vec<String> = c
            .try_get_with(k.as_str(), || {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(vec!["a".into(), "ü".into()])
            })
            .unwrap();
        assert_eq!(v, vec!["a", "ü"]);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(c.get::<Vec<String>>(k.as_str()).unwrap().unwrap().len(), 2);
    c.invalidate(k.as_str()).unwrap();
    assert_eq!(c.get::<Vec<String>>(k.as_str()).unwrap(), None);
    assert_eq!(
        c.get_with(k.as_str(), || vec!["b".to_string()]).unwrap(),
        vec!["b"]
    );
}

#[test]
fn memoize_compute_error_is_returned() {
    let c = cache(&backend(), LockOptions::new());
    let r: Result<u8, _> =
        c.try_get_with(key("err").as_str(), || Err(std::io::Error::other("nope")));
    assert!(matches!(r, Err(MemoizeError::Compute(ref e)) if e.to_string() == "nope"));
    // Issue 10, item 15: the message says what the compute said.
    assert_eq!(
        r.unwrap_err().to_string(),
        "computing the value failed: nope"
    );
}

#[test]
fn memoize_from_many_threads_computes_once() {
    let c = cache(
        &backend(),
        LockOptions::new().max_wait(Duration::from_secs(10)),
    );
    let k = key("threads");
    let calls = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (c, k, calls) = (c.clone(), k.clone(), calls.clone());
            std::thread::spawn(move || {
                c.try_get_with(k.as_str(), || {
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
    let b = backend();
    let k = key("lock");
    let lock = blocking::CacheLock::new(b.clone(), k.as_str(), LockOptions::new()).unwrap();
    let guard = lock.acquire().unwrap();
    assert_eq!(guard.key(), k);
    assert!(guard.remaining() > Duration::from_secs(29));
    assert!(guard.deadline() > tokio::time::Instant::now());
    let stored = futures_util::FutureExt::now_or_never(b.get(&k))
        .unwrap()
        .unwrap();
    assert_eq!(
        stored
            .map(|v| cachelock::Holder::parse(&v).token)
            .as_deref(),
        Some(guard.token())
    );
    // Held by this very lock: an error at once (issue 11), not a wait.
    assert!(lock.try_acquire().unwrap_err().is_already_held());
    // Held: another lock's try fails, a timed wait times out, also from
    // another thread.
    let other = blocking::CacheLock::new(b.clone(), k.as_str(), LockOptions::new()).unwrap();
    assert!(other.try_acquire().unwrap_err().is_held());
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
    assert!(out.held_throughout());
    assert_eq!(out.value, 5);
    // forget: the key stays until its lease runs out.
    lock.try_acquire().unwrap().forget();
    let other = blocking::CacheLock::new(b.clone(), k.as_str(), LockOptions::new()).unwrap();
    assert!(other.try_acquire().unwrap_err().is_held());
}

#[test]
fn dropped_guard_is_released_in_the_background() {
    let c = cache(&backend(), LockOptions::new());
    let lock = c.lock(key("drop"));
    drop(lock.acquire().unwrap());
    assert!(c.close().unwrap(), "close waits for the background release");
    assert!(lock.try_acquire().is_ok());
}

#[test]
fn stream_round_trip_and_early_drop() {
    let c = cache(&backend(), LockOptions::new());
    let k = key("iter");
    let items: Vec<Result<u32, std::io::Error>> = (0..10).map(Ok).collect();
    let mut it = c.stream_with(k.as_str(), items);
    assert_eq!(it.next().unwrap().unwrap(), 0);
    drop(it);
    // Dropped early: nothing cached, lock released (in the background).
    let again: Vec<u32> = c
        .stream_with(k.as_str(), (0..10).map(Ok::<u32, std::io::Error>))
        .map(Result::unwrap)
        .collect();
    assert_eq!(again, (0..10).collect::<Vec<_>>());
    let hit: Vec<u32> = c
        .stream_with(k.as_str(), Vec::<Result<u32, std::io::Error>>::new())
        .map(Result::unwrap)
        .collect();
    assert_eq!(hit, (0..10).collect::<Vec<_>>());
}

/// tokio's own bridge: blocking code in `spawn_blocking` works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_inside_spawn_blocking() {
    let c = cache(&backend(), LockOptions::new());
    let k = key("spawn-blocking");
    let v = tokio::task::spawn_blocking(move || {
        let g = c.lock(k.as_str()).try_acquire().unwrap();
        let _ = g.release().unwrap();
        c.get_with(k.as_str(), || 9u8).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(v, 9);
}

/// Where blocking could deadlock (the only thread of a current-thread
/// runtime), it refuses with its own error, saying why (issue 10, item 15).
#[tokio::test(flavor = "current_thread")]
async fn inside_a_current_thread_runtime_it_refuses_and_says_why() {
    let c = cache(&backend(), LockOptions::new());
    let r: Result<u8, MemoizeError<std::io::Error>> = c.try_get_with("k", || Ok(1));
    match r {
        Err(MemoizeError::Config(e)) => {
            assert!(e.is_blocking_refused(), "{e:?}");
            let text = e.to_string();
            assert!(text.contains("current-thread tokio runtime"), "{text}");
            assert!(text.contains("deadlock"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    let err = c.lock("k").acquire().unwrap_err();
    assert!(err.is_blocking_refused(), "{err:?}");
    assert!(c.get_with("k", || 1u8).unwrap_err().is_blocking_refused());
}

#[test]
fn connect_without_double_question_marks() {
    let c = blocking::connect("memory://").unwrap();
    assert_eq!(c.get_with("n", || 7u32).unwrap(), 7);
    assert!(blocking::connect("nope://x").is_err());
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn through_real_memcached() {
    let urls = server_env("CACHELOCK_TEST_MEMCACHED_URLS");
    let url = if urls.starts_with("memcached://") {
        urls
    } else {
        format!("memcached://{urls}")
    };
    let base = blocking::connect(&url).unwrap();
    let c = Cache::builder(base.as_async().backend().clone())
        .chunk_size(4096)
        .build()
        .unwrap()
        .blocking();
    let k = key("memcached");
    let calls = AtomicUsize::new(0);
    let big = "m".repeat(20_000) + &"n".repeat(20_000);
    for _ in 0..2 {
        let v: String = c
            .try_get_with(k.as_str(), || {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(big.clone())
            })
            .unwrap();
        assert_eq!(v, big);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let lk = key("memcached-lock");
    let lock = c.lock(lk.as_str());
    let g = lock.acquire().unwrap();
    assert!(lock.try_acquire().unwrap_err().is_already_held());
    let again = c.lock(lk.as_str());
    assert!(again.try_acquire().unwrap_err().is_held());
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

/// Issue 11: the blocking guard's keep-alive runs on cachelock's runtime,
/// so a blocking holder keeps its lock past the lease.
#[test]
fn keep_alive_renews_a_blocking_guard() {
    let b = backend();
    let k = key("keep-alive");
    let opts = LockOptions::new().lease(Duration::from_millis(300));
    let lock = blocking::CacheLock::new(b.clone(), k.as_str(), opts.clone()).unwrap();
    let guard = lock.acquire().unwrap();
    guard.keep_alive();
    std::thread::sleep(Duration::from_millis(1_000));
    assert!(!guard.is_lost());
    let other = blocking::CacheLock::new(b.clone(), k.as_str(), opts).unwrap();
    assert!(other.try_acquire().unwrap_err().is_held());
    assert_eq!(guard.release().unwrap(), cachelock::Released::Released);
}
