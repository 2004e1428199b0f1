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

/// Issue 10, item 3: the cache file deleted while a lock is held (a cache
/// clean-up, `rm -rf ~/.cache/...`). The holder's next owner-checked
/// operation reports the token gone instead of "renewing" on the unlinked
/// file, the lock says the lease was lost, and a later opener of the path,
/// which gets a fresh file, shares it with the first process.
#[tokio::test]
async fn deleting_the_file_loses_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locks.sqlite3");
    let first = SqliteBackend::open(&path).await.unwrap();
    let lease = Duration::from_secs(60);
    assert!(first.add("lock", b"tok-1", lease).await.unwrap());
    assert_eq!(
        first.extend_if_eq("lock", b"tok-1", lease).await.unwrap(),
        TokenCheck::Matched
    );

    let lock = CacheLock::new(
        Arc::new(first.clone()) as SharedBackend,
        "guarded",
        LockOptions::default().lease(lease),
    )
    .unwrap();
    let mut guard = lock.try_acquire().await.unwrap();

    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }

    // A second process opens the path: a fresh, empty file. It can take the
    // lock, so the first holder must learn that it lost it.
    let second = SqliteBackend::open(&path).await.unwrap();
    assert!(second.add("lock", b"tok-2", lease).await.unwrap());

    assert_eq!(
        first.extend_if_eq("lock", b"tok-1", lease).await.unwrap(),
        TokenCheck::Missing,
        "renewed a token that only the deleted file held"
    );
    let err = guard.extend(None).await.unwrap_err();
    assert!(err.is_lease_expired(), "{err:?}");

    // The first process now works on the same (new) file as the second.
    assert_eq!(
        first.get("lock").await.unwrap().as_deref(),
        Some(&b"tok-2"[..])
    );
    assert_eq!(
        first.delete_if_eq("lock", b"tok-1", lease).await.unwrap(),
        TokenCheck::Mismatch
    );
}

/// The directory of the file removed as well: owner-checked operations
/// still report the token missing (not a transient error to retry).
#[tokio::test]
async fn deleting_the_directory_loses_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("cache");
    std::fs::create_dir(&sub).unwrap();
    let b = SqliteBackend::open(sub.join("locks.sqlite3"))
        .await
        .unwrap();
    let lease = Duration::from_secs(60);
    assert!(b.add("lock", b"tok", lease).await.unwrap());
    std::fs::remove_dir_all(&sub).unwrap();
    assert_eq!(
        b.extend_if_eq("lock", b"tok", lease).await.unwrap(),
        TokenCheck::Missing
    );
    assert_eq!(
        b.delete_if_eq("lock", b"tok", lease).await.unwrap(),
        TokenCheck::Missing
    );
}

/// Issue 10, item 12: a relative `sqlite://` path would name another file
/// in every working directory; it is refused, saying why.
#[tokio::test]
async fn relative_sqlite_urls_are_refused() {
    for url in ["sqlite://relative.db", "sqlite://some/dir/locks.sqlite3"] {
        let err = cachelock::connect(url).await.unwrap_err();
        assert!(
            matches!(err, cachelock::BackendError::InvalidUrl { .. }),
            "{url}: {err:?}"
        );
        assert!(err.to_string().contains("absolute"), "{url}: {err}");
    }
}

/// Issue 10, item 12: with a short busy timeout, an operation while another
/// process holds SQLite's write lock gives up at once-ish (a no-wait
/// acquire), instead of waiting the default 10 s.
#[tokio::test]
async fn busy_timeout_bounds_the_wait_for_the_write_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.sqlite3");
    drop(SqliteBackend::open(&path).await.unwrap());
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();

    let url = format!("sqlite://{}", path.display());
    let options = cachelock::backend::url::ConnectOptions::new()
        .sqlite_busy_timeout(Duration::from_millis(100));
    let b = cachelock::BackendUrl::parse(&url)
        .unwrap()
        .connect_with(&options)
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let err = b.add("k", b"v", Duration::from_secs(5)).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "waited {:?}",
        start.elapsed()
    );
    holder.execute_batch("ROLLBACK").unwrap();
    assert!(b.add("k", b"v", Duration::from_secs(5)).await.unwrap());
}

/// Issue 10, item 15: the open error names the path once, as the backend
/// it is about (no empty key).
#[tokio::test]
async fn open_error_names_the_path_once() {
    let path = "/nonexistent-dir-cachelock/once.sqlite3";
    let err = SqliteBackend::open(path).await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(msg.matches(path).count(), 1, "{msg}");
    assert_eq!(err.key(), path);
    assert!(err.is_unavailable(), "{err:?}");
}

/// Any busy timeout is accepted: one SQLite cannot take (over 24 days in
/// milliseconds) is cut to the documented maximum instead of panicking in
/// rusqlite.
#[tokio::test]
async fn huge_busy_timeouts_do_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    for timeout in [Duration::MAX, Duration::from_secs(u64::from(u32::MAX))] {
        let b = SqliteBackend::open_with_busy_timeout(dir.path().join("huge.sqlite3"), timeout)
            .await
            .unwrap();
        assert!(b.set("k", b"v", Duration::from_secs(5)).await.is_ok());
    }
}
