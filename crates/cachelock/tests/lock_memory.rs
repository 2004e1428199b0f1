//! CacheLock on the in-memory backend, on paused time (no real sleeps).
#![allow(clippy::unwrap_used)] // test doubles below unwrap their own mutexes

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cachelock::{
    Backend, BackendError, BackendResult, CacheLock, Error, LockOptions, MemoryBackend,
    SharedBackend,
};

lock_tests!(
    Arc::new(MemoryBackend::new()) as SharedBackend,
    paused = true
);

fn memory() -> SharedBackend {
    Arc::new(MemoryBackend::new())
}

#[test]
fn invalid_options_are_refused_when_built() {
    let b = memory();
    let bad = [
        LockOptions::default().lease(Duration::ZERO),
        LockOptions::default().retry_interval(Duration::ZERO),
        // Over MAX_DURATION: refused, never a panic (issue 10, item 9).
        LockOptions::default().lease(Duration::MAX),
        LockOptions::default().retry_interval(Duration::MAX),
        LockOptions::default().max_wait(Duration::MAX),
        LockOptions::default().jitter(-0.1),
        LockOptions::default().jitter(f64::NAN),
    ];
    for opts in bad {
        let err = CacheLock::new(b.clone(), "k", opts.clone()).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{opts:?}: {err:?}");
    }
    let err = CacheLock::new(b, "", LockOptions::default()).unwrap_err();
    assert!(err.to_string().contains("cache key"), "{err}");
}

#[test]
fn dropped_guard_outside_a_runtime_logs_an_error() {
    let b = memory();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let guard = rt
        .block_on(
            CacheLock::new(b.clone(), "k", LockOptions::default())
                .unwrap()
                .acquire(),
        )
        .unwrap();
    drop(rt);
    let (logs, _g) = common::logs::capture();
    drop(guard);
    let errors = logs.at("ERROR");
    assert_eq!(errors.len(), 1, "{:?}", logs.lines());
    assert!(errors[0].contains("dropped without release"), "{errors:?}");
}

/// A test double around the in-memory backend: counts `add` calls and can
/// hold back `add`'s reply (after the add took effect), as a slow network does.
#[derive(Debug)]
struct SlowAdds {
    inner: MemoryBackend,
    adds: AtomicUsize,
    reply_delay: Duration,
    /// When set, `add` fails as unavailable (after taking effect if `true`).
    fail_adds: Mutex<Option<bool>>,
}

#[async_trait]
impl Backend for SlowAdds {
    async fn get(&self, key: &str) -> BackendResult<Option<Bytes>> {
        self.inner.get(key).await
    }
    async fn get_many(&self, keys: &[&str]) -> BackendResult<Vec<Option<Bytes>>> {
        self.inner.get_many(keys).await
    }
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<()> {
        self.inner.set(key, value, ttl).await
    }
    async fn set_many(&self, items: &[(&str, &[u8])], ttl: Duration) -> BackendResult<()> {
        self.inner.set_many(items, ttl).await
    }
    async fn add(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<bool> {
        self.adds.fetch_add(1, Ordering::SeqCst);
        let fail = *self.fail_adds.lock().unwrap();
        match fail {
            Some(true) => {
                self.inner.add(key, value, ttl).await?;
                return Err(BackendError::unavailable(key, "reply lost"));
            }
            Some(false) => return Err(BackendError::unavailable(key, "connection refused")),
            None => {}
        }
        let added = self.inner.add(key, value, ttl).await?;
        tokio::time::sleep(self.reply_delay).await;
        Ok(added)
    }
    async fn touch(&self, key: &str, ttl: Duration) -> BackendResult<bool> {
        self.inner.touch(key, ttl).await
    }
    async fn delete(&self, key: &str) -> BackendResult<bool> {
        self.inner.delete(key).await
    }
    async fn incr(&self, key: &str, delta: u64) -> BackendResult<u64> {
        self.inner.incr(key, delta).await
    }
}

fn slow(reply_delay: Duration) -> Arc<SlowAdds> {
    Arc::new(SlowAdds {
        inner: MemoryBackend::new(),
        adds: AtomicUsize::new(0),
        reply_delay,
        fail_adds: Mutex::new(None),
    })
}

#[tokio::test(start_paused = true)]
async fn timed_wait_ends_exactly_at_the_deadline() {
    let b = memory();
    let _holder = CacheLock::new(b.clone(), "j", LockOptions::default())
        .unwrap()
        .acquire()
        .await
        .unwrap();
    let waiter = CacheLock::new(
        b,
        "j",
        LockOptions::default().retry_interval(Duration::from_millis(300)),
    )
    .unwrap();
    let start = tokio::time::Instant::now();
    assert!(
        waiter
            .acquire_timeout(Duration::from_secs(10))
            .await
            .unwrap_err()
            .is_timed_out()
    );
    // The last sleep is cut to the time left: no overshoot at all here.
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn retry_sleeps_are_the_interval_plus_up_to_a_quarter() {
    // This backend cannot notify, so the waiter polls: its first attempt,
    // one more right after arming, then a capped backoff of 12.5, 25 and
    // 50 ms before the full interval (plus up to the jitter) each time.
    for (jitter, range) in [(0.0, 104..=104), (0.25, 84..=104)] {
        let b = slow(Duration::ZERO);
        let shared: SharedBackend = b.clone();
        let _holder = CacheLock::new(shared.clone(), "j", LockOptions::default())
            .unwrap()
            .acquire()
            .await
            .unwrap();
        let waiter = CacheLock::new(
            shared,
            "j",
            LockOptions::default()
                .retry_interval(Duration::from_millis(100))
                .jitter(jitter),
        )
        .unwrap();
        let _ = waiter.acquire_timeout(Duration::from_secs(10)).await;
        // One add by the holder; the rest are the waiter's attempts.
        let attempts = b.adds.load(Ordering::SeqCst) - 1;
        assert!(
            range.contains(&attempts),
            "jitter {jitter}: {attempts} attempts"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn cancelled_acquire_leaves_no_lock_behind() {
    // The add reaches the cache, but its reply is slow and the caller gives
    // up first: the interrupted acquire must not keep the lock for a lease.
    let b = slow(Duration::from_millis(100));
    let shared: SharedBackend = b.clone();
    let l = CacheLock::new(shared, "cancel", LockOptions::default()).unwrap();
    let attempt = tokio::time::timeout(Duration::from_millis(50), l.acquire()).await;
    assert!(attempt.is_err(), "the acquire was cut short");
    assert!(
        b.inner.get("cancel").await.unwrap().is_some(),
        "the add did take effect"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        b.inner.get("cancel").await.unwrap().is_none(),
        "and was cleaned up"
    );
}

#[tokio::test(start_paused = true)]
async fn an_add_whose_reply_was_lost_is_resolved_by_reading_back() {
    let b = slow(Duration::ZERO);
    let shared: SharedBackend = b.clone();
    let l = CacheLock::new(shared.clone(), "lost-reply", LockOptions::default()).unwrap();

    // The add took effect but its reply was lost: the read-back finds our
    // token, so the lock is ours.
    *b.fail_adds.lock().unwrap() = Some(true);
    let guard = l.try_acquire().await.unwrap();
    let stored = b.inner.get("lost-reply").await.unwrap().unwrap();
    assert_eq!(cachelock::Holder::parse(&stored).token, guard.token());
    let _ = guard.release().await.unwrap();

    // The add never happened (refused): a backend error, not "held".
    *b.fail_adds.lock().unwrap() = Some(false);
    let err = l.try_acquire().await.unwrap_err();
    assert!(err.is_unavailable() && !err.is_held(), "{err:?}");

    // Someone else holds it and our add failed: that is "held". (Another
    // CacheLock: this one holding it would be AlreadyHeld, issue 11.)
    *b.fail_adds.lock().unwrap() = None;
    let someone = CacheLock::new(shared.clone(), "lost-reply", LockOptions::default()).unwrap();
    let other = someone.try_acquire().await.unwrap();
    *b.fail_adds.lock().unwrap() = Some(false);
    assert!(l.try_acquire().await.unwrap_err().is_held());
    let _ = other.release().await.unwrap();
}

/// `Compat::Django`: the key holds the token as a pickled `str` (what
/// Django's caches store for djblets' token) through acquire, extend and
/// keep-alive, and the owner-checked release compares that value.
#[tokio::test(start_paused = true)]
async fn django_compat_stores_the_token_as_a_pickled_str() {
    use cachelock::backend::django::{pickle_str, unpickle_str};
    use cachelock::{Compat, KeyBuilder, Released, ValueFormat};

    let b = memory();
    let key = KeyBuilder::django("", 1).build("nightly");
    assert_eq!(key, ":1:nightly");
    let opts = LockOptions::default()
        .compat(Compat::Django)
        .lease(Duration::from_secs(3));
    let lock = CacheLock::new(b.clone(), key.clone(), opts).unwrap();
    let mut guard = lock.try_acquire().await.unwrap();
    let stored = b.get(&key).await.unwrap().unwrap();
    assert_eq!(stored.as_ref(), pickle_str(guard.token()).as_slice());
    assert_eq!(unpickle_str(&stored).as_deref(), Some(guard.token()));
    assert_eq!(
        b.decode_lock_value(&stored, ValueFormat::DjangoStr)
            .as_deref(),
        Some(guard.token())
    );
    guard.extend(None).await.unwrap();
    guard.keep_alive();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!guard.is_lost(), "renewals compare the pickled value");
    assert_eq!(
        b.get(&key).await.unwrap().unwrap().as_ref(),
        pickle_str(guard.token()).as_slice()
    );
    // A native lock on the same key is excluded; its raw-token release
    // would not match a pickled value.
    let native = CacheLock::new(b.clone(), key.clone(), LockOptions::default()).unwrap();
    assert!(native.try_acquire().await.unwrap_err().is_held());
    assert_eq!(
        b.delete_if_eq(&key, guard.token().as_bytes(), Duration::from_secs(1))
            .await
            .unwrap(),
        cachelock::TokenCheck::Mismatch
    );
    assert_eq!(guard.release().await.unwrap(), Released::Released);
    assert_eq!(b.get(&key).await.unwrap(), None);
}
