//! The conformance suite on the embedded SQLite backend, in real time (it
//! expires entries by the wall clock), plus cross-connection checks.
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use cachelock::{Backend, CacheLock, LockOptions, SharedBackend, SqliteBackend, TokenCheck};

/// A fresh cache file in a temp dir kept alive for the whole test binary.
async fn fresh() -> SqliteBackend {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let name = format!("{}.sqlite3", uuid_like());
    SqliteBackend::open(dir.path().join(name)).await.unwrap()
}

fn uuid_like() -> String {
    common::unique_key("db").replace(':', "-")
}

conformance_tests!(Arc::new(fresh().await) as SharedBackend, paused = false);

/// Two connections to one file (as two processes have) see one cache, and
/// adds racing from both have exactly one winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_share_one_cache() {
    let a = fresh().await;
    let b = SqliteBackend::open(a.path()).await.unwrap();
    let k = common::unique_key("shared");
    assert!(a.add(&k, b"tok", Duration::from_secs(30)).await.unwrap());
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"tok"[..]));
    assert_eq!(
        b.delete_if_eq(&k, b"other", Duration::ZERO).await.unwrap(),
        TokenCheck::Mismatch
    );
    assert_eq!(
        b.delete_if_eq(&k, b"tok", Duration::ZERO).await.unwrap(),
        TokenCheck::Matched
    );
    assert_eq!(a.get(&k).await.unwrap(), None);

    let race = common::unique_key("race");
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        let conn: SharedBackend = if i % 2 == 0 {
            Arc::new(a.clone())
        } else {
            Arc::new(b.clone())
        };
        let race = race.clone();
        tasks.push(tokio::spawn(async move {
            conn.add(&race, i.to_string().as_bytes(), Duration::from_secs(30))
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);
}

/// The lock works on it, ttl reports the lease, and a counter survives.
#[tokio::test]
async fn lock_and_ttl_on_sqlite() {
    let cache: SharedBackend = Arc::new(fresh().await);
    let key = common::unique_key("lock");
    let lock = CacheLock::new(
        cache.clone(),
        key.clone(),
        LockOptions::new().lease(Duration::from_secs(10)),
    )
    .unwrap();
    let guard = lock.try_acquire().await.unwrap();
    // Another CacheLock (this one would be AlreadyHeld, issue 11).
    let again = CacheLock::new(cache.clone(), key.clone(), LockOptions::new()).unwrap();
    assert!(again.try_acquire().await.unwrap_err().is_held());
    let ttl = cache.ttl(&key).await.unwrap().unwrap();
    assert!(
        ttl <= Duration::from_secs(10) && ttl > Duration::from_secs(8),
        "{ttl:?}"
    );
    assert!(cache.atomic_token_ops());
    assert_eq!(
        guard.release().await.unwrap(),
        cachelock::Released::Released
    );
    assert_eq!(cache.ttl(&key).await.unwrap(), None);

    let counter = common::unique_key("counter");
    assert_eq!(cache.incr(&counter, 3).await.unwrap(), 3);
    assert_eq!(cache.ttl(&counter).await.unwrap(), None, "no expiry");
}

/// Opening a file in a missing directory is a typed, one-line error naming it.
#[tokio::test]
async fn unopenable_file_is_unavailable() {
    let err = SqliteBackend::open("/nonexistent-dir-cachelock/x.sqlite3")
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        err.to_string()
            .contains("/nonexistent-dir-cachelock/x.sqlite3")
    );
}

/// connect() by URL gives a working SQLite backend; memory:// too.
#[tokio::test]
async fn connect_by_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("u.sqlite3").display());
    let cache = cachelock::connect(&url).await.unwrap();
    let k = common::unique_key("url");
    assert!(cache.add(&k, b"1", Duration::from_secs(5)).await.unwrap());
    let again = cachelock::connect(&url).await.unwrap();
    assert_eq!(again.get(&k).await.unwrap().as_deref(), Some(&b"1"[..]));

    let mem = cachelock::connect("memory://").await.unwrap();
    assert!(mem.add(&k, b"1", Duration::from_secs(5)).await.unwrap());

    let err = cachelock::connect("sqlite:///nonexistent-dir-cachelock/y.db")
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let err = cachelock::connect("nope://x").await.unwrap_err();
    assert!(matches!(err, cachelock::BackendError::InvalidUrl { .. }));
}

/// Many connections opening one new file at once (as the first processes
/// of a machine do) all succeed: SQLite's immediate "database is locked"
/// while another one switches the file to WAL is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_opens_succeed() {
    for _ in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.sqlite3");
        let opens: Vec<_> = (0..12)
            .map(|_| {
                let path = path.clone();
                tokio::spawn(async move { SqliteBackend::open(path).await })
            })
            .collect();
        for o in opens {
            let b = o.await.unwrap().unwrap();
            assert!(b.add("k", b"v", Duration::from_secs(5)).await.is_ok());
        }
    }
}
