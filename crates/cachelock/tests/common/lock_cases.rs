//! CacheLock cases, written once over any backend (the seed's
//! `CacheLockTests` in Rust form plus contention checks). `lock_tests!`
//! expands them for one backend; on the in-memory backend they run on paused
//! time, on real servers in real time (leases there are a few seconds).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cachelock::{CacheLock, Error, LockOptions, Released, SharedBackend};
use tokio::time::Instant;

use super::{logs, unique_key};

/// Expands every lock case into a test for one backend, as
/// [`conformance_tests!`](crate::conformance_tests) does (the same arguments).
#[macro_export]
macro_rules! lock_tests {
    ($make:expr, paused = $paused:tt $(, #[$attr:meta])*) => {
        $crate::lock_tests!(@cases $make, $paused, [$(#[$attr])*];
            acquire_new_lock, second_lock_non_blocking_gets_nothing, blocking_waiter_gets_lock_after_lease,
            waiter_times_out_and_holder_keeps_lock, per_call_no_wait_override, release_deletes,
            release_after_token_replaced_deletes_nothing, release_past_deadline_touches_nothing,
            release_after_key_lost_deletes_nothing, extend_with_default_and_custom_lease,
            extend_after_key_lost_warns, extend_past_deadline_touches_nothing, with_lock_releases,
            with_lock_reports_an_overrun, dropped_guard_releases_in_background,
            reacquire_after_release_gets_new_token, contending_tasks_never_overlap,
            keep_alive_outlives_the_lease, lost_fires_when_the_key_is_deleted,
            holder_names_this_process);
    };
    (@cases $make:expr, $paused:tt, $attrs:tt; $($case:ident),*) => {
        $(
            $crate::lock_tests!(@attrs $attrs
            #[tokio::test(flavor = "current_thread", start_paused = $paused)]
            async fn $case() {
                common::logs::init();
                let backend: cachelock::SharedBackend = $make;
                common::lock_cases::$case(backend).await;
            });
        )*
    };
    (@attrs [$(#[$attr:meta])*] $($item:tt)*) => {
        $(#[$attr])* $($item)*
    };
}

fn lock(b: &SharedBackend, key: &str, opts: LockOptions) -> CacheLock {
    CacheLock::new(b.clone(), key, opts).unwrap()
}

/// The token of the lock's holder (the stored value's first word).
async fn held_by(b: &SharedBackend, key: &str) -> Option<String> {
    b.get(key)
        .await
        .unwrap()
        .map(|v| cachelock::Holder::parse(&v).token)
}

fn is_uuid(token: &str) -> bool {
    token.len() == 36
        && token
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c) || c == '-')
}

pub async fn acquire_new_lock(b: SharedBackend) {
    let key = unique_key("new");
    let (logs, _g) = logs::capture();
    let guard = lock(&b, &key, LockOptions::default())
        .acquire()
        .await
        .unwrap();
    assert!(is_uuid(guard.token()), "{}", guard.token());
    assert_eq!(held_by(&b, &key).await.as_deref(), Some(guard.token()));
    assert!(!guard.is_lost());
    assert!(guard.remaining() > Duration::from_secs(29));
    let debug = logs.at("DEBUG");
    assert_eq!(debug.len(), 1, "{debug:?}");
    assert!(debug[0].contains("acquired cache lock"), "{debug:?}");
    assert!(
        debug[0].contains(&key) && debug[0].contains(guard.token()) && debug[0].contains("30s")
    );
    assert_eq!(guard.release().await.unwrap(), Released::Released);
}

pub async fn second_lock_non_blocking_gets_nothing(b: SharedBackend) {
    let key = unique_key("nonblocking");
    let first = lock(&b, &key, LockOptions::default())
        .acquire()
        .await
        .unwrap();
    let (logs, _g) = logs::capture();
    let second = lock(&b, &key, LockOptions::default());
    let err = second.try_acquire().await.unwrap_err();
    assert!(err.is_held(), "{err:?}");
    assert!(matches!(&err, Error::Held { key: k } if *k == key));
    assert!(
        logs.lines().is_empty(),
        "a non-blocking miss logs nothing: {:?}",
        logs.lines()
    );
    assert_eq!(held_by(&b, &key).await.as_deref(), Some(first.token()));
    let _ = first.release().await.unwrap();
}

pub async fn blocking_waiter_gets_lock_after_lease(b: SharedBackend) {
    let key = unique_key("waiter");
    let holder = lock(
        &b,
        &key,
        LockOptions::default().lease(Duration::from_secs(1)),
    );
    let held = holder.acquire().await.unwrap();
    let start = Instant::now();
    let waiter = lock(
        &b,
        &key,
        LockOptions::default().retry_interval(Duration::from_millis(50)),
    );
    let got = waiter.acquire().await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_ne!(got.token(), held.token());
    assert_eq!(held_by(&b, &key).await.as_deref(), Some(got.token()));
    // The old holder's lease is over: releasing it must not touch the new lock.
    assert_eq!(held.release().await.unwrap(), Released::Expired);
    assert_eq!(held_by(&b, &key).await.as_deref(), Some(got.token()));
    let _ = got.release().await.unwrap();
}

pub async fn waiter_times_out_and_holder_keeps_lock(b: SharedBackend) {
    let key = unique_key("timeout");
    let holder = lock(&b, &key, LockOptions::default())
        .acquire()
        .await
        .unwrap();
    let (logs, _g) = logs::capture();
    let waiter = lock(
        &b,
        &key,
        LockOptions::default()
            .max_wait(Duration::from_millis(50))
            .retry_interval(Duration::from_millis(400)),
    );
    let start = Instant::now();
    let err = waiter.acquire().await.unwrap_err();
    let waited = start.elapsed();
    assert!(err.is_timed_out(), "{err:?}");
    assert!(waited >= Duration::from_millis(50), "{waited:?}");
    // Never overshoots by a retry interval (400 ms here), only by a backend
    // round trip (room is left for slow round trips on a loaded machine).
    assert!(waited < Duration::from_millis(50 + 250), "{waited:?}");
    let warns = logs.at("WARN");
    assert_eq!(warns.len(), 1, "{:?}", logs.lines());
    assert!(warns[0].contains("timed out waiting for cache lock") && warns[0].contains(&key));
    assert!(
        !warns[0].contains(holder.token()),
        "tokens are never logged above debug"
    );
    assert_eq!(held_by(&b, &key).await.as_deref(), Some(holder.token()));
    let _ = holder.release().await.unwrap();
}

pub async fn per_call_no_wait_override(b: SharedBackend) {
    let key = unique_key("override");
    let holder = lock(&b, &key, LockOptions::default())
        .acquire()
        .await
        .unwrap();
    let waiter = lock(
        &b,
        &key,
        LockOptions::default().max_wait(Duration::from_secs(10)),
    );
    let (logs, _g) = logs::capture();
    let start = Instant::now();
    assert!(waiter.try_acquire().await.unwrap_err().is_held());
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(logs.lines().is_empty(), "{:?}", logs.lines());
    // A zero per-call timeout makes one attempt, then times out.
    assert!(
        waiter
            .acquire_timeout(Duration::ZERO)
            .await
            .unwrap_err()
            .is_timed_out()
    );
    assert_eq!(held_by(&b, &key).await.as_deref(), Some(holder.token()));
    let _ = holder.release().await.unwrap();
}

pub async fn release_deletes(b: SharedBackend) {
    let key = unique_key("release");
    let guard = lock(&b, &key, LockOptions::default())
        .acquire()
        .await
        .unwrap();
    let token = guard.token().to_owned();
    let (logs, _g) = logs::capture();
    assert_eq!(guard.release().await.unwrap(), Released::Released);
    assert_eq!(held_by(&b, &key).await, None);
    let debug = logs.at("DEBUG");
    assert_eq!(debug.len(), 1, "{debug:?}");
    assert!(debug[0].contains("released cache lock") && debug[0].contains(&token));
}

pub async fn release_after_token_replaced_deletes_nothing(b: SharedBackend) {
    let key = unique_key("replaced");
    let guard = lock(&b, &key, LockOptions::default())
        .acquire()
        .await
        .unwrap();
    b.set(&key, b"XXX", Duration::from_secs(60)).await.unwrap();
    let (logs, _g) = logs::capture();
    assert_eq!(guard.release().await.unwrap(), Released::Lost);
    assert_eq!(held_by(&b, &key).await.as_deref(), Some("XXX"));
    assert_eq!(
        logs.at("WARN").len(),
        1,
        "a lost lease is reported: {:?}",
        logs.lines()
    );
    b.delete(&key).await.unwrap();
}

pub async fn release_past_deadline_touches_nothing(b: SharedBackend) {
    let key = unique_key("past-deadline");
    let guard = lock(
        &b,
        &key,
        LockOptions::default().lease(Duration::from_secs(1)),
    )
    .acquire()
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(guard.is_lost());
    // Someone else takes the expired lock; our late release must leave it be.
    let other = lock(&b, &key, LockOptions::default())
        .try_acquire()
        .await
        .unwrap();
    let (logs, _g) = logs::capture();
    assert_eq!(guard.release().await.unwrap(), Released::Expired);
    // A lease that ran out is a loss: a WARN, as for Lost (issue 10, item 1).
    assert!(
        logs.at("WARN")
            .iter()
            .any(|l| l.contains("ran out before release") && l.contains(&key)),
        "{:?}",
        logs.lines()
    );
    assert_eq!(held_by(&b, &key).await.as_deref(), Some(other.token()));
    let _ = other.release().await.unwrap();
}

pub async fn release_after_key_lost_deletes_nothing(b: SharedBackend) {
    let key = unique_key("lost");
    let guard = lock(&b, &key, LockOptions::default())
        .acquire()
        .await
        .unwrap();
    b.delete(&key).await.unwrap(); // evicted, or the server restarted
    assert_eq!(guard.release().await.unwrap(), Released::Lost);
    assert_eq!(held_by(&b, &key).await, None);
}

pub async fn extend_with_default_and_custom_lease(b: SharedBackend) {
    let key = unique_key("extend");
    let mut guard = lock(
        &b,
        &key,
        LockOptions::default().lease(Duration::from_secs(5)),
    )
    .acquire()
    .await
    .unwrap();
    let (logs, _g) = logs::capture();
    guard.extend(Some(Duration::from_secs(100))).await.unwrap();
    assert!(
        guard.remaining() > Duration::from_secs(95),
        "{:?}",
        guard.remaining()
    );
    if let Some(ttl) = b.ttl(&key).await.unwrap() {
        assert!(
            ttl > Duration::from_secs(90) && ttl <= Duration::from_secs(101),
            "{ttl:?}"
        );
    }
    guard.extend(None).await.unwrap();
    assert!(
        guard.remaining() <= Duration::from_secs(5),
        "{:?}",
        guard.remaining()
    );
    if let Some(ttl) = b.ttl(&key).await.unwrap() {
        assert!(
            ttl <= Duration::from_secs(6),
            "back to the lock's own lease: {ttl:?}"
        );
    }
    let debug = logs.at("DEBUG");
    assert_eq!(debug.len(), 2, "{debug:?}");
    assert!(debug.iter().all(|l| l.contains("extended cache lock")));
    assert!(
        debug[0].contains("100s") && debug[1].contains("5s"),
        "{debug:?}"
    );
    assert_eq!(held_by(&b, &key).await.as_deref(), Some(guard.token()));
    let _ = guard.release().await.unwrap();
}

pub async fn extend_after_key_lost_warns(b: SharedBackend) {
    let key = unique_key("extend-lost");
    let mut guard = lock(&b, &key, LockOptions::default())
        .acquire()
        .await
        .unwrap();
    b.delete(&key).await.unwrap();
    let (logs, _g) = logs::capture();
    let err = guard.extend(None).await.unwrap_err();
    assert!(err.is_lease_expired(), "{err:?}");
    assert!(guard.is_lost());
    let warns = logs.at("WARN");
    assert_eq!(warns.len(), 1, "{:?}", logs.lines());
    assert!(warns[0].contains("fell out of cache") && warns[0].contains(&key));
    // Someone else's lock is not extended by us either.
    b.set(&key, b"other", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(guard.extend(None).await.unwrap_err().is_lease_expired());
    assert_eq!(held_by(&b, &key).await.as_deref(), Some("other"));
    assert_eq!(guard.release().await.unwrap(), Released::Lost);
    assert_eq!(held_by(&b, &key).await.as_deref(), Some("other"));
    b.delete(&key).await.unwrap();
}

pub async fn with_lock_releases(b: SharedBackend) {
    let key = unique_key("closure");
    let l = lock(&b, &key, LockOptions::default());
    let (b2, k2) = (b.clone(), key.clone());
    let out = l
        .with_lock(|_| async move { held_by(&b2, &k2).await })
        .await
        .unwrap();
    assert!(out.held_throughout(), "{out:?}");
    let seen = out.into_value();
    assert!(
        seen.as_deref().is_some_and(is_uuid),
        "held inside: {seen:?}"
    );
    assert_eq!(held_by(&b, &key).await, None, "released after");
}

/// Issue 10, item 1: the closure form tells the caller that the lease ran
/// out while the work ran (it used to return `Ok(value)` and log nothing).
/// With keep-alive (issue 11) the lease runs out only past `max_hold`.
pub async fn with_lock_reports_an_overrun(b: SharedBackend) {
    let key = unique_key("closure-overrun");
    let l = lock(
        &b,
        &key,
        LockOptions::default()
            .lease(Duration::from_secs(1))
            .max_hold(Duration::from_millis(1)),
    );
    let (logs, _g) = logs::capture();
    let out = l
        .with_lock(|_| async {
            tokio::time::sleep(Duration::from_millis(1_300)).await;
            7
        })
        .await
        .unwrap();
    assert!(!out.held_throughout());
    assert_eq!(out.released, Ok(Released::Expired));
    assert_eq!(out.value, 7);
    assert!(
        logs.at("WARN").iter().any(|l| l.contains(&key)),
        "{:?}",
        logs.lines()
    );
}

/// Issue 10, item 2: past the local deadline `extend` never touches the
/// cache and says `LeaseExpired`, on every backend. (Memcached used to
/// touch the key and succeed when the server still had it.) The key is
/// put back with our token and a long TTL, as a server with a coarse or
/// late clock would still have it.
pub async fn extend_past_deadline_touches_nothing(b: SharedBackend) {
    use super::memoize_cases::{Op, Wrap};
    let w = Wrap::new(b.clone());
    let key = unique_key("extend-late");
    let mut guard = lock(
        &w.shared(),
        &key,
        LockOptions::default().lease(Duration::from_secs(1)),
    )
    .acquire()
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    b.set(&key, guard.token().as_bytes(), Duration::from_secs(60))
        .await
        .unwrap();
    w.clear();
    let (logs, _g) = logs::capture();
    let err = guard.extend(None).await.unwrap_err();
    assert!(err.is_lease_expired(), "{err:?}");
    assert!(guard.is_lost());
    assert_eq!(
        w.count(|op| matches!(op, Op::ExtendIfEq(_))),
        0,
        "{:?}",
        w.ops()
    );
    assert!(
        logs.at("WARN").iter().any(|l| l.contains(&key)),
        "{:?}",
        logs.lines()
    );
    assert_eq!(guard.release().await.unwrap(), Released::Expired);
    b.delete(&key).await.unwrap();
}

pub async fn dropped_guard_releases_in_background(b: SharedBackend) {
    let key = unique_key("dropped");
    let guard = lock(&b, &key, LockOptions::default())
        .acquire()
        .await
        .unwrap();
    drop(guard);
    for _ in 0..100 {
        if held_by(&b, &key).await.is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("a dropped guard must release the lock in the background");
}

pub async fn reacquire_after_release_gets_new_token(b: SharedBackend) {
    let key = unique_key("reacquire");
    let l = lock(&b, &key, LockOptions::default());
    let first = l.acquire().await.unwrap();
    let t1 = first.token().to_owned();
    let _ = first.release().await.unwrap();
    let second = l.try_acquire().await.unwrap();
    assert_ne!(second.token(), t1);
    let _ = second.release().await.unwrap();
}

pub async fn contending_tasks_never_overlap(b: SharedBackend) {
    const TASKS: usize = 64;
    const ROUNDS: usize = 3;
    let key = Arc::new(unique_key("contend"));
    let inside = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (b, key, inside, entered) = (b.clone(), key.clone(), inside.clone(), entered.clone());
        tasks.push(tokio::spawn(async move {
            let l = CacheLock::new(
                b,
                key.as_str(),
                LockOptions::default().retry_interval(Duration::from_millis(2)),
            )
            .unwrap();
            for _ in 0..ROUNDS {
                let guard = l.acquire().await.unwrap();
                assert_eq!(
                    inside.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two holders at once"
                );
                entered.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(200)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                assert_eq!(guard.release().await.unwrap(), Released::Released);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(entered.load(Ordering::SeqCst), TASKS * ROUNDS);
}

/// Issue 11: keep-alive renews the lease (owner-checked) on every backend,
/// so the lock outlives its lease; release then deletes it.
pub async fn keep_alive_outlives_the_lease(b: SharedBackend) {
    let key = unique_key("keep-alive");
    let l = lock(
        &b,
        &key,
        LockOptions::default().lease(Duration::from_secs(1)),
    );
    let guard = l.acquire().await.unwrap();
    guard.keep_alive();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(!guard.is_lost());
    assert_eq!(held_by(&b, &key).await.as_deref(), Some(guard.token()));
    let other = lock(&b, &key, LockOptions::default());
    assert!(other.try_acquire().await.unwrap_err().is_held());
    assert_eq!(guard.release().await.unwrap(), Released::Released);
    assert_eq!(held_by(&b, &key).await, None);
}

/// Issue 11: a key lost under keep-alive (deleted, as by an eviction) is
/// found at the next renewal and `lost()` completes, on every backend.
pub async fn lost_fires_when_the_key_is_deleted(b: SharedBackend) {
    let key = unique_key("lost");
    let l = lock(
        &b,
        &key,
        LockOptions::default().lease(Duration::from_secs(3)),
    );
    let guard = l.acquire().await.unwrap();
    guard.keep_alive();
    let (logs, _g) = logs::capture();
    b.delete(&key).await.unwrap();
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), guard.lost())
        .await
        .expect("lost() within one renewal period");
    assert!(start.elapsed() <= Duration::from_millis(1_100));
    assert!(guard.is_lost());
    assert!(
        logs.at("WARN").iter().any(|l| l.contains(&key)),
        "{:?}",
        logs.lines()
    );
    assert_eq!(guard.release().await.unwrap(), Released::Lost);
}

/// `tasks` tasks take turns on lock `key` until `rounds` grants were made,
/// each noting its guard's fence while it holds the lock (so the notes are
/// in grant order). Returns the fences in grant order.
pub async fn fences_in_grant_order(
    backend: SharedBackend,
    key: &str,
    tasks: usize,
    rounds: usize,
) -> Vec<u64> {
    let notes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            // A CacheLock of its own: re-acquiring through the holder's is AlreadyHeld.
            let lock = CacheLock::new(
                backend.clone(),
                key,
                LockOptions::new()
                    .lease(Duration::from_secs(10))
                    .retry_interval(Duration::from_millis(1)),
            )
            .unwrap();
            let notes = notes.clone();
            tokio::spawn(async move {
                loop {
                    let guard = lock.acquire().await.unwrap();
                    let done = {
                        let mut notes = notes.lock().unwrap();
                        if notes.len() >= rounds {
                            true
                        } else {
                            notes.push(guard.fence());
                            false
                        }
                    };
                    assert_eq!(guard.release().await.unwrap(), Released::Released);
                    if done {
                        return;
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    Arc::try_unwrap(notes).unwrap().into_inner().unwrap()
}

/// Fails unless every fence is above the one before.
pub fn assert_strictly_increasing(fences: &[u64]) {
    for (i, w) in fences.windows(2).enumerate() {
        assert!(
            w[0] < w[1],
            "grant {}: fence {} after {}",
            i + 1,
            w[1],
            w[0]
        );
    }
}

/// The stored value says who holds the lock: this host and process, since
/// when, and the command given; the token stays the owner check.
pub async fn holder_names_this_process(b: SharedBackend) {
    let key = unique_key("holder");
    let l = lock(
        &b,
        &key,
        LockOptions::default().holder_command("nightly report --all"),
    );
    assert_eq!(l.holder().await.unwrap(), None);
    let guard = l.acquire().await.unwrap();
    let h = l.holder().await.unwrap().expect("held");
    assert_eq!(h.token, guard.token());
    assert_eq!(h.pid, Some(std::process::id()));
    assert!(h.host.is_some_and(|h| !h.is_empty()));
    assert_eq!(h.command.as_deref(), Some("nightly report --all"));
    let age = std::time::SystemTime::now()
        .duration_since(h.since.expect("since"))
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60), "{age:?}");
    assert_eq!(guard.release().await.unwrap(), Released::Released);
    assert_eq!(l.holder().await.unwrap(), None);
}
