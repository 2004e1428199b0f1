//! Notified hand-off: a release wakes a waiter at once (the wake-up is armed
//! before each attempt, so none is lost), a release that is never announced
//! costs at most one poll interval capped by the holder's lease, and a
//! releasing holder does not starve a waiter that is already queued. On the
//! embedded backend (paused time) and on the real Redis, where waiters get
//! the lock in the order they came (the wait queue).
#![allow(clippy::unwrap_used)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use cachelock::{CacheLock, LockGuard, LockOptions, MemoryBackend, SharedBackend};
use tokio::time::Instant;

/// A retry interval so long that only a wake-up can explain a fast acquire.
const SLOW_POLL: Duration = Duration::from_secs(100);

fn lock(backend: &SharedBackend, key: &str, lease: Duration, retry: Duration) -> CacheLock {
    CacheLock::new(
        backend.clone(),
        key,
        LockOptions::new()
            .lease(lease)
            .retry_interval(retry)
            .jitter(0.0),
    )
    .unwrap()
}

/// Starts `waiter` acquiring, waits `settle` (time for it to queue),
/// releases `guard`; returns how long after the release the waiter got the
/// lock. Panics with `never` if it has not within 10 s.
async fn release_to(
    guard: LockGuard,
    waiter: CacheLock,
    settle: Duration,
    never: &str,
) -> Duration {
    let waiter = tokio::spawn(async move {
        let g = waiter.acquire().await.unwrap();
        let at = Instant::now();
        let _ = g.release().await.unwrap();
        at
    });
    tokio::time::sleep(settle).await;
    let released = Instant::now();
    let _ = guard.release().await.unwrap();
    let acquired = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect(never)
        .unwrap();
    acquired.saturating_duration_since(released)
}

/// Holds the lock, starts a waiter, releases after `hold`; returns how long
/// after the release the waiter got the lock.
async fn handoff_after_release(backend: SharedBackend, key: &str, hold: Duration) -> Duration {
    let l = lock(&backend, key, Duration::from_secs(30), SLOW_POLL);
    let guard = l.acquire().await.unwrap();
    // A CacheLock of its own: re-acquiring through the holder's is
    // AlreadyHeld.
    let waiter = lock(&backend, key, Duration::from_secs(30), SLOW_POLL);
    release_to(
        guard,
        waiter,
        hold,
        "the waiter was not woken by the release",
    )
    .await
}

/// The holder dies (its guard is forgotten): returns how long the waiter
/// waited in all, and the lease.
async fn wait_for_dead_holder(
    backend: SharedBackend,
    key: &str,
    lease: Duration,
    poll: Duration,
) -> Duration {
    let l = lock(&backend, key, lease, poll);
    l.acquire().await.unwrap().forget();
    let start = Instant::now();
    let g = l.acquire().await.unwrap();
    let waited = start.elapsed();
    let _ = g.release().await.unwrap();
    waited
}

#[tokio::test(start_paused = true)]
async fn memory_release_wakes_the_waiter_at_once() {
    let backend: SharedBackend = Arc::new(MemoryBackend::new());
    // Released right away (the waiter may still be between its arm and its
    // first wait) and after the waiter sleeps: never a poll interval.
    for hold in [
        Duration::ZERO,
        Duration::from_millis(1),
        Duration::from_secs(5),
    ] {
        let took = handoff_after_release(backend.clone(), "wake", hold).await;
        assert!(
            took < Duration::from_millis(10),
            "hold {hold:?}: hand-off took {took:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn memory_dead_holder_costs_at_most_its_lease() {
    let backend: SharedBackend = Arc::new(MemoryBackend::new());
    // Lease shorter than the poll interval: the watch fires at the expiry.
    let lease = Duration::from_millis(400);
    let waited = wait_for_dead_holder(backend.clone(), "dead", lease, SLOW_POLL).await;
    assert!(
        waited >= lease && waited < lease + Duration::from_millis(10),
        "{waited:?}"
    );
    // Lease longer than the poll interval: at most one poll interval more.
    let poll = Duration::from_millis(250);
    let waited = wait_for_dead_holder(backend, "dead2", Duration::from_secs(2), poll).await;
    assert!(
        waited >= Duration::from_secs(2) && waited <= Duration::from_secs(2) + poll,
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn memory_releaser_does_not_starve_a_queued_waiter() {
    let backend: SharedBackend = Arc::new(MemoryBackend::new());
    // The default retry interval (250 ms): the waiter is queued when the
    // holder releases and at once takes the lock again.
    let l = CacheLock::new(backend.clone(), "fair", LockOptions::new()).unwrap();
    let guard = l.acquire().await.unwrap();
    let waiter = {
        // A CacheLock of its own: re-acquiring through the holder's is
        // AlreadyHeld.
        let l = CacheLock::new(backend, "fair", LockOptions::new()).unwrap();
        tokio::spawn(async move {
            let g = l.acquire().await.unwrap();
            let _ = g.release().await.unwrap();
            Instant::now()
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let released = Instant::now();
    let _ = guard.release().await.unwrap();
    // The releaser comes straight back.
    let again = l.acquire().await.unwrap();
    let releaser_back = Instant::now();
    let waiter_done = waiter.await.unwrap();
    let _ = again.release().await.unwrap();
    assert!(
        waiter_done <= releaser_back,
        "the releaser took the lock back before the queued waiter"
    );
    assert!(waiter_done - released < Duration::from_millis(10));
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use cachelock::{RedisBackend, TokenCheck};

    async fn standalone() -> SharedBackend {
        let url = common::server_env("CACHELOCK_TEST_REDIS_URL");
        Arc::new(
            RedisBackend::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}")),
        )
    }

    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn redis_release_wakes_a_waiter_in_another_process() {
        // Two backends: two subscriber connections, as two processes have.
        let (a, b) = (standalone().await, standalone().await);
        let key = common::unique_key("wake");
        for hold in [Duration::ZERO, Duration::from_millis(200)] {
            let la = lock(&a, &key, Duration::from_secs(30), SLOW_POLL);
            let lb = lock(&b, &key, Duration::from_secs(30), SLOW_POLL);
            let guard = la.acquire().await.unwrap();
            let took = release_to(guard, lb, hold, "the waiter was not woken by the release").await;
            assert!(
                took < Duration::from_secs(1),
                "hold {hold:?}: hand-off took {took:?}"
            );
        }
    }

    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn redis_dead_holder_costs_at_most_one_poll_interval() {
        let backend = standalone().await;
        let key = common::unique_key("dead");
        let (lease, poll) = (Duration::from_millis(500), Duration::from_millis(300));
        let waited = wait_for_dead_holder(backend, &key, lease, poll).await;
        assert!(waited >= lease, "{waited:?}");
        assert!(
            waited <= lease + poll + Duration::from_millis(150),
            "{waited:?}"
        );
    }

    /// Four waiters (each its own backend, as four processes) queue up one
    /// after the other behind a holder, which releases and at once asks
    /// again: the lock goes round in arrival order, the releaser last.
    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn redis_waiters_get_the_lock_in_the_order_they_came() {
        let key = common::unique_key("fifo");
        let holder = lock(
            &standalone().await,
            &key,
            Duration::from_secs(30),
            SLOW_POLL,
        );
        let guard = holder.acquire().await.unwrap();
        let guard_fence = guard.fence();
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..4 {
            let l = lock(
                &standalone().await,
                &key,
                Duration::from_secs(30),
                SLOW_POLL,
            );
            let order = order.clone();
            waiters.push(tokio::spawn(async move {
                let g = l.acquire().await.unwrap();
                order.lock().push((i, g.fence()));
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = g.release().await.unwrap();
            }));
            // Time for its first attempt (which puts it in line).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = guard.release().await.unwrap();
        let again = tokio::time::timeout(Duration::from_secs(10), holder.acquire())
            .await
            .expect("the releaser never got the lock back")
            .unwrap();
        order.lock().push((4, again.fence()));
        let _ = again.release().await.unwrap();
        for w in waiters {
            w.await.unwrap();
        }
        let order = order.lock();
        let who: Vec<usize> = order.iter().map(|&(i, _)| i).collect();
        assert_eq!(who, vec![0, 1, 2, 3, 4]);
        // The fences rise in grant order, from the first holder's on.
        let mut fences = vec![guard_fence];
        fences.extend(order.iter().map(|&(_, f)| f));
        common::lock_cases::assert_strictly_increasing(&fences);
    }

    /// A waiter that gave up (timed out) left the line: the release hands the
    /// lock to the next one at once, though that one polls only every 100 s.
    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn redis_a_waiter_that_gave_up_is_not_handed_the_lock() {
        let key = common::unique_key("gaveup");
        let holder = lock(
            &standalone().await,
            &key,
            Duration::from_secs(30),
            SLOW_POLL,
        );
        let guard = holder.acquire().await.unwrap();
        let quitter = lock(
            &standalone().await,
            &key,
            Duration::from_secs(30),
            SLOW_POLL,
        );
        let err = quitter
            .acquire_timeout(Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.is_timed_out(), "{err}");
        let next = lock(
            &standalone().await,
            &key,
            Duration::from_secs(30),
            SLOW_POLL,
        );
        // The quitter leaves the line in the background; the next waiter
        // queues behind where it was.
        let took = release_to(
            guard,
            next,
            Duration::from_millis(100),
            "the lock was handed to the waiter that gave up",
        )
        .await;
        assert!(took < Duration::from_millis(45), "hand-off took {took:?}");
    }

    /// A waiter handed the lock by a release holds it for the claim at
    /// first, and extends it to its own lease a third of the claim in,
    /// without being asked.
    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn redis_a_handed_over_lock_is_extended_to_its_lease() {
        let key = common::unique_key("claim");
        let (lease, poll) = (Duration::from_secs(30), Duration::from_millis(300));
        let b = standalone().await;
        let guard = lock(&b, &key, lease, poll).acquire().await.unwrap();
        let waiter = lock(&standalone().await, &key, lease, poll);
        let waiting = tokio::spawn(async move { waiter.acquire().await.unwrap() });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = guard.release().await.unwrap();
        let handed = waiting.await.unwrap();
        tokio::time::sleep(cachelock::HANDOFF_CLAIM + Duration::from_millis(200)).await;
        let ttl = b.ttl(&key).await.unwrap().expect("the lock is still held");
        assert!(ttl > lease - Duration::from_secs(5), "server TTL {ttl:?}");
        assert!(
            handed.remaining() > lease - Duration::from_secs(5),
            "guard valid for {:?}",
            handed.remaining()
        );
        assert!(!handed.is_lost());
        assert_eq!(
            handed.release().await.unwrap(),
            cachelock::Released::Released
        );
    }

    /// A waiter that died in line (its future leaked: it never leaves) is
    /// handed the lock like any other, but for the claim only (it never
    /// extends it to its lease); then the next waiter gets it within one
    /// poll interval.
    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn redis_a_waiter_that_died_in_line_holds_the_lock_for_the_claim_only() {
        let key = common::unique_key("diedinline");
        let (poll, dead_lease) = (Duration::from_millis(300), Duration::from_secs(30));
        let holder = lock(&standalone().await, &key, Duration::from_secs(30), poll);
        let guard = holder.acquire().await.unwrap();
        let dead = lock(&standalone().await, &key, dead_lease, poll);
        let mut dying = Box::pin(dead.acquire());
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut dying)
                .await
                .is_err()
        );
        // Never polled or dropped again: it stays in line, as a crashed
        // process's waiter does.
        std::mem::forget(dying);
        let next = lock(&standalone().await, &key, Duration::from_secs(30), poll);
        let took = release_to(
            guard,
            next,
            Duration::from_millis(100),
            "the waiter behind a dead one never got the lock",
        )
        .await;
        // The release handed the dead waiter the lock for the claim (not
        // its 30 s lease); the next waiter gets it at its first poll after.
        let claim = cachelock::HANDOFF_CLAIM;
        assert!(
            took >= claim - Duration::from_millis(50)
                && took <= claim + poll + Duration::from_millis(300),
            "hand-off past a dead waiter took {took:?}"
        );
    }

    /// The queue calls of three waiters, by hand: a release hands the lock
    /// to the first in line (its value, a new fence); a waiter that leaves
    /// the line after it was handed the lock hands it on; the last one to
    /// leave frees it.
    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn redis_a_lock_handed_to_a_waiter_that_left_is_handed_on() {
        use cachelock::Queued;
        let b = standalone().await;
        let key = common::unique_key("leftinline");
        let lease = Duration::from_secs(30);
        let Queued::Granted(first) = b.add_queued(&key, b"a", lease).await.unwrap() else {
            panic!("the free lock was not granted");
        };
        for waiter in [&b"b"[..], b"c"] {
            let Queued::Held { latest_fence } = b.add_queued(&key, waiter, lease).await.unwrap()
            else {
                panic!("a held lock was granted");
            };
            assert_eq!(latest_fence, Some(first.fence));
        }
        assert_eq!(
            b.delete_if_eq(&key, b"a", lease).await.unwrap(),
            TokenCheck::Matched
        );
        assert_eq!(b.get(&key).await.unwrap().as_deref(), Some(&b"b"[..]));
        let handed = b.fence(&key).await.unwrap().unwrap();
        assert!(handed > first.fence);
        // A waiter whose notice was lost: its next attempt finds it ours,
        // with the fence of the hand-off.
        let Queued::Granted(again) = b.add_queued(&key, b"b", lease).await.unwrap() else {
            panic!("the lock handed to b is not b's");
        };
        assert_eq!(again.fence, handed);
        // b stops waiting as it is handed the lock: c gets it.
        b.leave_queue(&key, b"b", lease).await.unwrap();
        assert_eq!(b.get(&key).await.unwrap().as_deref(), Some(&b"c"[..]));
        assert!(b.fence(&key).await.unwrap().unwrap() > handed);
        // Leaving again, or leaving a lock someone else holds, changes nothing.
        b.leave_queue(&key, b"b", lease).await.unwrap();
        assert_eq!(b.get(&key).await.unwrap().as_deref(), Some(&b"c"[..]));
        b.leave_queue(&key, b"c", lease).await.unwrap();
        assert_eq!(b.get(&key).await.unwrap(), None);
    }

    /// A waiter cancelled just as the lock is handed to it (its task is
    /// aborted right after the release) does not keep it: the next waiter,
    /// which polls only every 100 s, gets it at once.
    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn redis_a_waiter_cancelled_at_the_hand_off_passes_the_lock_on() {
        let key = common::unique_key("cancelled");
        let long = Duration::from_secs(30);
        let holder = lock(&standalone().await, &key, long, SLOW_POLL);
        let guard = holder.acquire().await.unwrap();
        let cancelled = lock(&standalone().await, &key, long, SLOW_POLL);
        let task = {
            let cancelled = cancelled.clone();
            tokio::spawn(async move {
                let g = cancelled.acquire().await.unwrap();
                tokio::time::sleep(SLOW_POLL).await;
                drop(g);
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let next = lock(&standalone().await, &key, long, SLOW_POLL);
        let waiter = tokio::spawn(async move { next.acquire().await.unwrap() });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = guard.release().await.unwrap();
        task.abort();
        let _ = task.await;
        let g = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("the lock stayed with the cancelled waiter")
            .unwrap();
        assert!(cancelled.close().await);
        let _ = g.release().await.unwrap();
    }

    /// A waiter that cannot hear release notices (its Redis user may not
    /// subscribe) is handed the lock all the same, and finds it its own at
    /// its next poll, with the hand-off's fence, above the last holder's.
    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn redis_a_waiter_whose_notice_is_lost_gets_the_lock_within_a_poll() {
        let server = common::servers::PrivateRedis::start(&[
            "--user",
            "deaf",
            "on",
            ">pw",
            "~*",
            "&*",
            "+@all",
            "-subscribe",
            "-psubscribe",
        ]);
        let holder_backend: SharedBackend =
            Arc::new(RedisBackend::connect(&server.url()).await.unwrap());
        let deaf: SharedBackend = Arc::new(
            RedisBackend::connect(&format!("redis://deaf:pw@127.0.0.1:{}", server.port))
                .await
                .unwrap(),
        );
        let key = common::unique_key("deaf");
        let poll = Duration::from_millis(300);
        let holder = lock(&holder_backend, &key, Duration::from_secs(30), poll);
        let guard = holder.acquire().await.unwrap();
        let first = guard.fence();
        let waiter = lock(&deaf, &key, Duration::from_secs(30), poll);
        let task = tokio::spawn(async move {
            let g = waiter.acquire().await.unwrap();
            (Instant::now(), g)
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        let released = Instant::now();
        let _ = guard.release().await.unwrap();
        assert!(
            holder_backend.get(&key).await.unwrap().is_some(),
            "the release freed the lock instead of handing it on"
        );
        let (at, g) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the deaf waiter never got the lock")
            .unwrap();
        let took = at.saturating_duration_since(released);
        assert!(took <= poll + Duration::from_millis(150), "took {took:?}");
        assert!(g.fence() > first);
        assert_eq!(g.fence(), deaf.fence(&key).await.unwrap().unwrap());
        let _ = g.release().await.unwrap();
    }

    /// A hand-off costs the waiter nothing: it holds the lock when the
    /// notice comes. Counted on a server of its own with `INFO
    /// commandstats`: the holder's add and release, the waiter's two
    /// attempts (one before, one after arming its wake-up) and its release.
    /// (The waiter releases at once, before its claim extension is due:
    /// that sends nothing.)
    #[tokio::test]
    #[ignore = "needs the test servers: scripts/test"]
    async fn redis_a_notified_hand_off_sends_no_command() {
        let server = common::servers::PrivateRedis::start(&[]);
        let (a, b): (SharedBackend, SharedBackend) = (
            Arc::new(RedisBackend::connect(&server.url()).await.unwrap()),
            Arc::new(RedisBackend::connect(&server.url()).await.unwrap()),
        );
        // Loads the scripts.
        let warm = lock(&a, "warm", Duration::from_secs(30), SLOW_POLL);
        let _ = warm.acquire().await.unwrap().release().await.unwrap();
        let key = common::unique_key("free");
        let holder = lock(&a, &key, Duration::from_secs(30), SLOW_POLL);
        let guard = holder.acquire().await.unwrap();
        redis_cli(server.port, &["CONFIG", "RESETSTAT"]);
        let waiter = lock(&b, &key, Duration::from_secs(30), SLOW_POLL);
        let took = release_to(guard, waiter, Duration::from_millis(200), "no hand-off").await;
        assert!(took < Duration::from_secs(1), "{took:?}");
        let stats = redis_cli(server.port, &["INFO", "commandstats"]);
        let evalsha = stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no EVALSHA count in {stats}"));
        assert_eq!(evalsha, 4, "{stats}");
    }

    fn redis_cli(port: u16, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .arg("-p")
            .arg(port.to_string())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    }
}
