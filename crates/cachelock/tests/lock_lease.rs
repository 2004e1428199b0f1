//! Keep-alive, the loss signal, the safety margin and reentrancy (issue 11),
//! on the in-memory backend on paused time.
#![allow(clippy::unwrap_used)] // test doubles below unwrap their own mutexes

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cachelock::{
    Backend, BackendError, BackendResult, CacheLock, LockOptions, MemoryBackend, Released,
    SharedBackend, TokenCheck,
};
use tokio::time::Instant;

/// Records the order of the owner-checked operations; `extend_if_eq` takes
/// `extend_delay` (a slow renewal in flight) and fails while `fail_extends`
/// is above zero.
#[derive(Debug, Default)]
struct Recording {
    inner: MemoryBackend,
    log: Mutex<Vec<&'static str>>,
    extend_delay: Mutex<Duration>,
    fail_extends: AtomicUsize,
}

impl Recording {
    fn log(&self) -> Vec<&'static str> {
        self.log.lock().unwrap().clone()
    }
    fn push(&self, op: &'static str) {
        self.log.lock().unwrap().push(op);
    }
    fn extends(&self) -> usize {
        self.log()
            .iter()
            .filter(|op| **op == "extend-start")
            .count()
    }
}

#[async_trait]
impl Backend for Recording {
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
        self.inner.add(key, value, ttl).await
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
    async fn delete_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        hold: Duration,
    ) -> BackendResult<TokenCheck> {
        self.push("delete");
        self.inner.delete_if_eq(key, expected, hold).await
    }
    async fn extend_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        ttl: Duration,
    ) -> BackendResult<TokenCheck> {
        self.push("extend-start");
        let delay = *self.extend_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        if self
            .fail_extends
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            self.push("extend-failed");
            return Err(BackendError::unavailable(key, "injected"));
        }
        let r = self.inner.extend_if_eq(key, expected, ttl).await;
        self.push("extend-end");
        r
    }
    fn atomic_token_ops(&self) -> bool {
        true
    }
}

fn recording() -> Arc<Recording> {
    Arc::new(Recording::default())
}

fn lock(b: &Arc<Recording>, opts: LockOptions) -> CacheLock {
    let b: SharedBackend = b.clone();
    CacheLock::new(b, common::unique_key("lease"), opts).unwrap()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// After the first delete, nothing but nothing: no renewal reaches the
/// backend once the release started.
fn assert_nothing_after_delete(log: &[&str]) {
    let at = log.iter().position(|op| *op == "delete").expect("a delete");
    assert_eq!(
        &log[at..],
        ["delete"],
        "operations after the release: {log:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn keep_alive_holds_the_lock_past_its_lease() {
    let b = recording();
    let l = lock(&b, LockOptions::new().lease(secs(3)));
    let guard = l.acquire().await.unwrap();
    guard.keep_alive();
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    assert!(!guard.is_lost());
    assert_eq!(
        b.get(l.key())
            .await
            .unwrap()
            .map(|v| cachelock::Holder::parse(&v).token)
            .as_deref(),
        Some(guard.token())
    );
    // A renewal every third of the lease: at 1, 2, ..., 10 s.
    assert_eq!(b.extends(), 10, "{:?}", b.log());
    assert_eq!(guard.release().await.unwrap(), Released::Released);
    tokio::time::sleep(secs(10)).await;
    assert_nothing_after_delete(&b.log());
}

/// Redisson #7272: a renewal in flight when release is called must finish
/// before the delete, and none may start after it.
#[tokio::test(start_paused = true)]
async fn no_renewal_reaches_the_server_after_release() {
    let b = recording();
    *b.extend_delay.lock().unwrap() = Duration::from_millis(300);
    let l = lock(&b, LockOptions::new().lease(secs(3)));
    let guard = l.acquire().await.unwrap();
    guard.keep_alive();
    // The first renewal starts at 1 s and is in flight until 1.3 s.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(b.log(), ["extend-start"]);
    let started = Instant::now();
    assert_eq!(guard.release().await.unwrap(), Released::Released);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(200),
        "waited for the renewal"
    );
    tokio::time::sleep(secs(10)).await;
    assert_eq!(b.log(), ["extend-start", "extend-end", "delete"]);
    assert_eq!(b.get(l.key()).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn no_renewal_reaches_the_server_after_a_drop() {
    let b = recording();
    *b.extend_delay.lock().unwrap() = Duration::from_millis(300);
    let l = lock(&b, LockOptions::new().lease(secs(3)));
    let guard = l.acquire().await.unwrap();
    guard.keep_alive();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    drop(guard);
    tokio::time::sleep(secs(10)).await;
    assert!(l.close().await);
    assert_eq!(b.log(), ["extend-start", "extend-end", "delete"]);
    assert_eq!(b.get(l.key()).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn lost_fires_when_the_key_is_evicted() {
    let b = recording();
    let l = lock(&b, LockOptions::new().lease(secs(3)));
    let guard = l.acquire().await.unwrap();
    guard.keep_alive();
    let lost = guard.lost();
    let start = Instant::now();
    b.delete(l.key()).await.unwrap(); // evicted
    lost.await;
    // Found at the first renewal, a third of the lease in.
    assert_eq!(start.elapsed(), secs(1));
    assert!(guard.is_lost());
    assert!(guard.lost().is_lost());
    assert_eq!(guard.release().await.unwrap(), Released::Lost);
    // Nothing was sent after the loss was found (no renewal, no delete).
    assert_eq!(b.log(), ["extend-start", "extend-end"]);
}

#[tokio::test(start_paused = true)]
async fn lost_fires_at_lease_less_margin_without_keep_alive() {
    let b = recording();
    let l = lock(
        &b,
        LockOptions::new().lease(secs(10)).safety_margin(secs(1)),
    );
    let start = Instant::now();
    let guard = l.acquire().await.unwrap();
    assert_eq!(guard.deadline(), start + secs(9));
    let lost = guard.lost();
    tokio::select! {
        () = lost => {}
        () = tokio::time::sleep(secs(60)) => panic!("lost never fired"),
    }
    assert_eq!(start.elapsed(), secs(9));
    // The server still holds the key (its TTL is the whole lease) ...
    assert!(b.get(l.key()).await.unwrap().is_some());
    // ... but the holder no longer trusts it and does not touch it.
    assert_eq!(guard.release().await.unwrap(), Released::Expired);
    assert!(b.get(l.key()).await.unwrap().is_some());
    tokio::time::sleep(secs(1)).await;
    assert_eq!(b.get(l.key()).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn the_default_margin_is_one_percent_of_the_lease() {
    let b = recording();
    let l = lock(&b, LockOptions::new().lease(secs(100)));
    let start = Instant::now();
    let mut guard = l.acquire().await.unwrap();
    assert_eq!(guard.deadline(), start + secs(99));
    tokio::time::sleep(secs(5)).await;
    guard.extend(Some(secs(50))).await.unwrap();
    assert_eq!(
        guard.deadline(),
        start + secs(5) + Duration::from_millis(49_500)
    );
    let _ = guard.release().await.unwrap();
}

#[test]
fn a_margin_not_shorter_than_the_lease_is_refused() {
    let b: SharedBackend = Arc::new(MemoryBackend::new());
    for margin in [secs(3), secs(4)] {
        let err = CacheLock::new(
            b.clone(),
            "k",
            LockOptions::new().lease(secs(3)).safety_margin(margin),
        )
        .unwrap_err();
        assert!(matches!(err, cachelock::Error::InvalidConfig(_)), "{err}");
    }
}

#[tokio::test(start_paused = true)]
async fn failed_renewals_are_retried_while_time_remains() {
    let b = recording();
    b.fail_extends.store(3, Ordering::SeqCst);
    let l = lock(&b, LockOptions::new().lease(secs(3)));
    let guard = l.acquire().await.unwrap();
    guard.keep_alive();
    // Fails at 1 s, 1.3 s, 1.6 s; succeeds at 1.9 s.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert!(!guard.is_lost());
    assert_eq!(
        b.log(),
        [
            "extend-start",
            "extend-failed",
            "extend-start",
            "extend-failed",
            "extend-start",
            "extend-failed",
            "extend-start",
            "extend-end"
        ]
    );
    assert_eq!(guard.release().await.unwrap(), Released::Released);
}

#[tokio::test(start_paused = true)]
async fn renewals_failing_until_the_deadline_lose_the_lease() {
    let b = recording();
    b.fail_extends.store(usize::MAX, Ordering::SeqCst);
    let l = lock(&b, LockOptions::new().lease(secs(3)));
    let start = Instant::now();
    let guard = l.acquire().await.unwrap();
    guard.keep_alive();
    guard.lost().await;
    // The deadline: 3 s less the default margin of 30 ms.
    assert_eq!(start.elapsed(), Duration::from_millis(2_970));
    assert_eq!(guard.release().await.unwrap(), Released::Expired);
}

#[tokio::test(start_paused = true)]
async fn max_hold_ends_the_renewals() {
    let b = recording();
    let l = lock(&b, LockOptions::new().lease(secs(3)).max_hold(secs(5)));
    let start = Instant::now();
    let guard = l.acquire().await.unwrap();
    guard.keep_alive();
    guard.lost().await;
    // Renewed at 1, 2, 3 and 4 s; at the 5 s wake-up max_hold has passed,
    // so the lease from the 4 s renewal runs out at 6.97 s.
    assert_eq!(start.elapsed(), Duration::from_millis(6_970));
    assert_eq!(b.extends(), 4, "{:?}", b.log());
    assert_eq!(guard.release().await.unwrap(), Released::Expired);
}

#[tokio::test(start_paused = true)]
async fn with_lock_keeps_the_lease_alive_and_passes_the_loss_signal() {
    let b = recording();
    let l = lock(&b, LockOptions::new().lease(secs(3)));
    let out = l
        .with_lock(|lost| async move {
            tokio::time::sleep(secs(10)).await;
            lost.is_lost()
        })
        .await
        .unwrap();
    assert!(!out.value, "the lease was kept alive");
    assert!(out.held_throughout());

    let (b2, key) = (b.clone(), l.key().to_owned());
    let out = l
        .with_lock(|lost| async move {
            b2.delete(&key).await.unwrap();
            tokio::select! {
                () = lost => "abandoned",
                () = tokio::time::sleep(secs(60)) => "finished",
            }
        })
        .await
        .unwrap();
    assert_eq!(out.value, "abandoned");
    assert_eq!(out.released.unwrap(), Released::Lost);
}

#[tokio::test(start_paused = true)]
async fn acquiring_a_lock_this_cachelock_holds_fails_at_once() {
    let b = recording();
    let l = lock(&b, LockOptions::new().lease(secs(30)));
    let guard = l.acquire().await.unwrap();
    let start = Instant::now();
    let err = l.acquire().await.unwrap_err();
    assert!(err.is_already_held(), "{err}");
    assert!(l.clone().try_acquire().await.unwrap_err().is_already_held());
    assert!(
        l.acquire_timeout(secs(60))
            .await
            .unwrap_err()
            .is_already_held()
    );
    assert_eq!(start.elapsed(), Duration::ZERO, "no waiting on ourselves");
    // Another CacheLock on the same key waits as usual (here: is told it is held).
    let other = CacheLock::new(b.clone() as SharedBackend, l.key(), LockOptions::new()).unwrap();
    assert!(other.try_acquire().await.unwrap_err().is_held());
    // Released (or dropped): acquirable again.
    let _ = guard.release().await.unwrap();
    let guard = l.try_acquire().await.unwrap();
    drop(guard);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let _ = l.try_acquire().await.unwrap().release().await.unwrap();
}

/// A waiter of the same CacheLock does not wait on a guard taken (by a
/// clone) while it waited.
#[tokio::test(start_paused = true)]
async fn a_waiter_stops_when_its_own_lock_takes_the_key() {
    let b = recording();
    let l = lock(&b, LockOptions::new().lease(secs(30)));
    let other = CacheLock::new(b.clone() as SharedBackend, l.key(), LockOptions::new()).unwrap();
    let held = other.acquire().await.unwrap();
    let waiter = {
        let l = l.clone();
        tokio::spawn(async move { l.acquire().await.map(|g| g.forget()) })
    };
    tokio::time::sleep(secs(1)).await;
    let _ = held.release().await.unwrap();
    let mine = l.acquire().await.unwrap();
    let start = Instant::now();
    let err = waiter.await.unwrap().unwrap_err();
    assert!(err.is_already_held(), "{err}");
    assert!(start.elapsed() <= secs(1));
    let _ = mine.release().await.unwrap();
}
