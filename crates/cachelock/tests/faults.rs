//! Fault-injection scenarios (issue 6): a PRIVATE Redis or Memcached behind
//! a fault proxy, a cachelock backend connected through the proxy, and a
//! fault: the server killed and restarted, latency above the response
//! timeout, connections cut in the middle of a response, a holder paused
//! past its lease, eviction. Each scenario is written once and run on both
//! servers, and checks the three promises:
//!
//! 1. no wrong deletion: a holder never deletes or extends a lock another
//!    holder now owns;
//! 2. exclusion while the lease holds: no second holder while the key is
//!    kept and the holder is inside its lease;
//! 3. no wrong data: every value returned is the one that was stored or
//!    computed for that key,
//!
//! and that cachelock recovers by itself afterwards. Every scenario bounds
//! its own duration and uses loopback only.
#![cfg(all(feature = "redis", feature = "memcached"))]
#![allow(clippy::unwrap_used)]
mod common;

use std::time::Duration;

use cachelock::{BackendError, CacheLock, Error, LockOptions, Released, Wait};
use common::rig::{Kind, Rig, RigOptions, assert_recovers, bounded, retry_unavailable};
use common::{logs, unique_key};
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(60);

/// Runs each scenario `fn name(kind: Kind)` on Redis and on Memcached.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod redis {
            $(
                #[tokio::test(flavor = "current_thread")]
                async fn $name() {
                    super::$name(super::Kind::Redis).await;
                }
            )*
        }
        mod memcached {
            $(
                #[tokio::test(flavor = "current_thread")]
                async fn $name() {
                    super::$name(super::Kind::Memcached).await;
                }
            )*
        }
    };
}

on_both!(
    server_killed_and_restarted_while_a_lock_is_held,
    latency_above_the_response_timeout,
    connection_cut_in_the_middle_of_a_large_value,
    holder_paused_past_its_lease,
    eviction_under_memory_pressure,
    tokens_never_logged_above_debug,
);

fn lock(rig_backend: &cachelock::SharedBackend, key: &str, lease: Duration) -> CacheLock {
    CacheLock::new(
        rig_backend.clone(),
        key,
        LockOptions::new()
            .lease(lease)
            .retry_interval(Duration::from_millis(50)),
    )
    .unwrap()
}

async fn token_under(b: &cachelock::SharedBackend, key: &str) -> Option<String> {
    let v = retry_unavailable(|| b.get(key), BackendError::is_unavailable)
        .await
        .unwrap();
    v.map(|v| String::from_utf8(v.to_vec()).unwrap())
}

// ---------------------------------------------------------------------------
// Server killed and restarted

async fn server_killed_and_restarted_while_a_lock_is_held(kind: Kind) {
    let Some(mut rig) = Rig::start(kind).await else {
        return;
    };
    bounded(Duration::from_secs(60), async {
        let b = rig.backend.clone();
        let key = unique_key("restart");
        let lock = lock(&b, &key, Duration::from_secs(30));
        let mut old = lock.try_acquire().await.unwrap();
        // Exclusion while the lease holds.
        assert!(lock.try_acquire().await.unwrap_err().is_held());

        rig.kill();
        // While it is down: typed errors, quickly; nobody gets the lock.
        let t = Instant::now();
        let e = lock.try_acquire().await.unwrap_err();
        assert!(e.is_unavailable(), "{e:?}");
        let e = old.extend(None).await.unwrap_err();
        assert!(e.is_unavailable(), "{e:?}");
        assert!(!old.is_lost(), "a failed extend keeps the lease as it was");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

        // Restarted empty: the next acquire works (once the client noticed).
        rig.spawn();
        let new = retry_unavailable(|| lock.try_acquire(), Error::is_unavailable)
            .await
            .unwrap();
        assert_ne!(new.token(), old.token());

        // The old holder learns the lock is gone and touches nothing.
        let e = old.extend(None).await.unwrap_err();
        assert!(e.is_lease_expired(), "{e:?}");
        assert!(old.is_lost());
        assert_eq!(old.release().await.unwrap(), Released::Lost);
        assert_eq!(
            token_under(&b, &key).await.as_deref(),
            Some(new.token()),
            "the new holder's key is untouched"
        );
        assert_eq!(new.release().await.unwrap(), Released::Released);
        assert_recovers(&b).await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// Latency above the response timeout

async fn latency_above_the_response_timeout(kind: Kind) {
    let options = RigOptions {
        response_timeout: Duration::from_millis(300),
        ..RigOptions::default()
    };
    let Some(rig) = Rig::start_with(kind, options).await else {
        return;
    };
    bounded(Duration::from_secs(60), async {
        let b = rig.backend.clone();
        let (k1, k2) = (unique_key("slow-1"), unique_key("slow-2"));
        b.set(&k1, b"value one", LONG).await.unwrap();
        b.set(&k2, b"value two", LONG).await.unwrap();
        let held_key = unique_key("slow-held");
        let held = lock(&b, &held_key, Duration::from_secs(20));
        let mut guard = held.try_acquire().await.unwrap();
        let free = lock(&b, &unique_key("slow-free"), Duration::from_secs(3));

        rig.proxy.set_latency(Duration::from_secs(1));
        for _ in 0..3 {
            let t = Instant::now();
            let e = b.get(&k1).await.unwrap_err();
            assert!(e.is_unavailable(), "{e:?}");
            assert!(
                t.elapsed() < Duration::from_millis(1500),
                "{:?}",
                t.elapsed()
            );
        }
        let t = Instant::now();
        let e = guard.extend(None).await.unwrap_err();
        assert!(e.is_unavailable(), "{e:?}");
        assert!(!guard.is_lost());
        // Neither a held nor a free lock is handed out on a timeout.
        let e = held.try_acquire().await.unwrap_err();
        assert!(e.is_unavailable(), "{e:?}");
        let e = free.try_acquire().await.unwrap_err();
        assert!(e.is_unavailable(), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

        rig.proxy.heal();
        // Late replies of timed-out requests are never taken as the answer
        // to a later one: every value read is the one stored under its key.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut good = 0;
        while good < 20 {
            assert!(Instant::now() < deadline, "no recovery after heal");
            for (k, v) in [(&k1, &b"value one"[..]), (&k2, &b"value two"[..])] {
                match b.get(k).await {
                    Ok(got) => {
                        assert_eq!(got.as_deref(), Some(v), "wrong data for {k}");
                        good += 1;
                    }
                    Err(e) => assert!(e.is_unavailable(), "{e:?}"),
                }
            }
        }
        let mut extended = guard.extend(None).await;
        for _ in 0..100 {
            match &extended {
                Err(e) if e.is_unavailable() => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    extended = guard.extend(None).await;
                }
                _ => break,
            }
        }
        extended.unwrap();
        assert_eq!(
            token_under(&b, &held_key).await.as_deref(),
            Some(guard.token())
        );
        // The free lock: its timed-out add was cleaned up or expires with
        // its 3 s lease; either way it can be taken again.
        let g = free
            .acquire_with(Wait::Timeout(Duration::from_secs(6)))
            .await
            .unwrap();
        assert_eq!(g.release().await.unwrap(), Released::Released);
        assert_eq!(guard.release().await.unwrap(), Released::Released);
        assert_recovers(&b).await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// Connection cut in the middle of a response

async fn connection_cut_in_the_middle_of_a_large_value(kind: Kind) {
    let Some(rig) = Rig::start(kind).await else {
        return;
    };
    bounded(Duration::from_secs(60), async {
        let b = rig.backend.clone();
        let k = unique_key("cut");
        let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        b.set(&k, &big, LONG).await.unwrap();

        rig.proxy.cut_after_bytes(64 * 1024);
        for _ in 0..3 {
            match b.get(&k).await {
                Ok(v) => panic!(
                    "a cut reply was returned as a value ({:?} bytes)",
                    v.map(|v| v.len())
                ),
                Err(e) => assert!(e.is_unavailable(), "{e:?}"),
            }
        }
        // A write whose reply is cut: it may or may not have happened, but a
        // read sees one whole value or the other, never a mix.
        let other: Vec<u8> = vec![7u8; 700_000];
        rig.proxy.cut_after_bytes(1);
        let _ = b.set(&k, &other, LONG).await;
        rig.proxy.heal();
        let got = retry_unavailable(|| b.get(&k), BackendError::is_unavailable)
            .await
            .unwrap()
            .unwrap();
        assert!(
            got == big || got == other,
            "a mixed value ({} bytes)",
            got.len()
        );

        // A lock taken while replies are cut is never handed out silently:
        // either an error, or a lock whose token is really stored.
        let lk = unique_key("cut-lock");
        let l = lock(&b, &lk, Duration::from_secs(5));
        rig.proxy.cut_after_bytes(1);
        let cut_result = l.try_acquire().await;
        rig.proxy.heal();
        match cut_result {
            Ok(g) => {
                assert_eq!(token_under(&b, &lk).await.as_deref(), Some(g.token()));
                assert_eq!(g.release().await.unwrap(), Released::Released);
            }
            Err(e) => assert!(e.is_unavailable(), "{e:?}"),
        }
        let g = l
            .acquire_with(Wait::Timeout(Duration::from_secs(8)))
            .await
            .unwrap();
        assert_eq!(g.release().await.unwrap(), Released::Released);
        assert_recovers(&b).await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// A holder paused past its lease

async fn holder_paused_past_its_lease(kind: Kind) {
    let Some(rig) = Rig::start(kind).await else {
        return;
    };
    bounded(Duration::from_secs(30), async {
        let b = rig.backend.clone();
        let other_client = rig.another_client().await;
        let key = unique_key("paused");
        let mine = lock(&b, &key, Duration::from_secs(1));
        let theirs = lock(&other_client, &key, Duration::from_secs(10));

        let mut paused = mine.try_acquire().await.unwrap();
        assert!(theirs.try_acquire().await.unwrap_err().is_held());
        // The holder is paused (a GC pause, a stopped process) for 2.5 s,
        // in real time, while the server's TTL runs out.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let new = theirs.try_acquire().await.unwrap();

        let e = paused.extend(None).await.unwrap_err();
        assert!(e.is_lease_expired(), "{e:?}");
        let r = paused.release().await.unwrap();
        assert!(matches!(r, Released::Expired | Released::Lost), "{r:?}");
        assert_eq!(
            token_under(&b, &key).await.as_deref(),
            Some(new.token()),
            "the new holder's key is untouched"
        );
        // A second paused holder that only releases (no extend first).
        assert_eq!(new.release().await.unwrap(), Released::Released);
        let paused = mine.try_acquire().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let new = theirs.try_acquire().await.unwrap();
        assert_eq!(paused.release().await.unwrap(), Released::Expired);
        assert_eq!(token_under(&b, &key).await.as_deref(), Some(new.token()));
        assert_eq!(new.release().await.unwrap(), Released::Released);
        assert_recovers(&b).await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// Eviction

async fn eviction_under_memory_pressure(kind: Kind) {
    let options = RigOptions {
        memcached_args: ["-m", "2"].map(String::from).to_vec(),
        redis_args: ["--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"]
            .map(String::from)
            .to_vec(),
        ..RigOptions::default()
    };
    let Some(rig) = Rig::start_with(kind, options).await else {
        return;
    };
    bounded(Duration::from_secs(60), async {
        let b = rig.backend.clone();
        let filler = rig.direct().await;
        let key = unique_key("evicted");
        let l = lock(&b, &key, Duration::from_secs(60));
        let mut guard = l.try_acquire().await.unwrap();
        let vk = unique_key("evicted-value");
        let value: Vec<u8> = (0..100_000u32).map(|i| (i % 13) as u8).collect();
        b.set(&vk, &value, LONG).await.unwrap();

        // Another client fills the cache until the lock key is evicted.
        // Small values of sizes around the token's, so the lock item's slab
        // class (Memcached evicts per class) fills up, and large ones.
        let small = [b'x'; 64];
        let large = vec![b'y'; 100_000];
        let mut evicted = false;
        for i in 0..100_000u32 {
            let k = format!("{key}:fill:{i}");
            filler
                .set(&k, &small[..(i % 64) as usize], LONG)
                .await
                .unwrap();
            if i % 50 == 0 {
                let _ = filler.set(&format!("{k}:big"), &large, LONG).await;
            }
            // Checked seldom: a read marks the item active, which keeps it
            // from being evicted for a while.
            if i % 20_000 == 19_999 && filler.get(&key).await.unwrap().is_none() {
                evicted = true;
                break;
            }
        }
        assert!(evicted, "the lock key was never evicted");

        // Every value read is the right one or absent.
        if let Some(v) = b.get(&vk).await.unwrap() {
            assert_eq!(v, value, "wrong data after eviction");
        }
        // The loss is reported, and nothing is deleted.
        let e = guard.extend(None).await.unwrap_err();
        assert!(e.is_lease_expired(), "{e:?}");
        let new = l.try_acquire().await.unwrap();
        assert_eq!(guard.release().await.unwrap(), Released::Lost);
        assert_eq!(token_under(&b, &key).await.as_deref(), Some(new.token()));
        assert_eq!(new.release().await.unwrap(), Released::Released);
        assert_recovers(&b).await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// Security: tokens never logged above DEBUG

async fn tokens_never_logged_above_debug(kind: Kind) {
    let Some(mut rig) = Rig::start(kind).await else {
        return;
    };
    let (logs, _g) = logs::capture();
    let tokens = bounded(Duration::from_secs(60), async {
        let b = rig.backend.clone();
        let key = unique_key("log-tokens");
        let l = lock(&b, &key, Duration::from_secs(1));
        let mut tokens = Vec::new();

        // Acquire, extend, release.
        let mut g = l.try_acquire().await.unwrap();
        tokens.push(g.token().to_owned());
        g.extend(None).await.unwrap();
        g.release().await.unwrap();
        // A waiter that times out.
        let g = l.try_acquire().await.unwrap();
        tokens.push(g.token().to_owned());
        let e = l
            .acquire_with(Wait::Timeout(Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert!(e.is_timed_out(), "{e:?}");
        // Lost: the key is replaced behind the holder's back.
        b.set(&key, b"someone-else", LONG).await.unwrap();
        let mut g2 = g;
        assert!(g2.extend(None).await.unwrap_err().is_lease_expired());
        assert_eq!(g2.release().await.unwrap(), Released::Lost);
        b.delete(&key).await.unwrap();
        // Expired by the local deadline; dropped guards.
        let g = l.try_acquire().await.unwrap();
        tokens.push(g.token().to_owned());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(g.release().await.unwrap(), Released::Expired);
        let g = retry_unavailable(|| l.try_acquire(), |e: &Error| e.is_held())
            .await
            .unwrap();
        tokens.push(g.token().to_owned());
        drop(g);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The server dies while a lock is held: failed extend and release.
        let mut g = retry_unavailable(|| l.try_acquire(), |e: &Error| e.is_held())
            .await
            .unwrap();
        tokens.push(g.token().to_owned());
        rig.kill();
        assert!(g.extend(None).await.is_err());
        assert!(g.release().await.is_err());
        let r = l.with_lock(|| async {}).await;
        assert!(r.is_err());
        rig.spawn();
        assert_recovers(&b).await;
        tokens
    })
    .await;

    let above_debug: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|l| ["INFO", "WARN", "ERROR"].iter().any(|lv| l.starts_with(lv)))
        .collect();
    assert!(
        above_debug.iter().any(|l| l.starts_with("WARN")),
        "the lost and timed-out paths log warnings: {above_debug:?}"
    );
    assert!(
        logs.at("DEBUG").iter().any(|l| l.contains(&tokens[0])),
        "tokens do appear at DEBUG, so the capture works"
    );
    for t in &tokens {
        for line in &above_debug {
            assert!(
                !line.contains(t.as_str()),
                "token {t} logged above DEBUG: {line}"
            );
        }
    }
}
