//! The embedded SQLite backend: a cache in one file, shared by every process
//! on the machine that opens it.
//!
//! One table holds the entries (`key TEXT PRIMARY KEY, value BLOB,
//! expires_at INTEGER`, milliseconds since the Unix epoch, `NULL` for no
//! expiry). The database runs in WAL mode with a busy timeout, so readers do
//! not block the writer and concurrent writers queue instead of failing.
//! Every operation that reads and then writes (`add`, `incr`,
//! `delete_if_eq`, `extend_if_eq`, `touch`, `set_many`) runs in one
//! `BEGIN IMMEDIATE` transaction, which takes SQLite's write lock up front:
//! the operations are atomic across threads *and* processes, and
//! [`atomic_token_ops`](Backend::atomic_token_ops) is `true`.
//!
//! # Clock
//!
//! Expiry is measured on the **wall clock** ([`SystemTime`]), not on
//! [`tokio::time`]: the file is shared between processes, which share no
//! tokio clock. So this backend does not follow paused tokio time in tests,
//! and a wall-clock step (NTP, a manual change) shortens or lengthens the
//! TTLs in flight by that step. TTLs are kept in whole milliseconds, rounded
//! up.
//!
//! # A deleted or replaced file
//!
//! Every operation first checks that the path still names the file that is
//! open (same device and inode, on Unix). If the file was deleted or
//! replaced (a cache clean-up such as `rm -rf ~/.cache`), the path is opened
//! afresh, so this process and every later one share the new file, and an
//! owner-checked operation ([`extend_if_eq`](Backend::extend_if_eq),
//! [`delete_if_eq`](Backend::delete_if_eq)) answers [`TokenCheck::Missing`]:
//! the token was in the old file, so a lock held there is reported lost and
//! never "renewed" on an unlinked file.
//!
//! # Blocking
//!
//! rusqlite is blocking. Every call runs on [`tokio::task::spawn_blocking`],
//! so the async runtime is never blocked, even while SQLite waits for
//! another process's write lock. One `SqliteBackend` (and its clones) holds
//! one connection, so the calls of one process run one at a time; they are
//! short (tens of microseconds).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};

use super::{
    Backend, DEFAULT_MAX_VALUE_SIZE, FENCE_TTL, Grant, Listed, TokenCheck, ValueFormat,
    check_value_size, fence_floor, fence_key, next_fence,
};
use crate::error::{BackendError, BackendResult};

/// How long SQLite waits for another connection's write lock by default.
pub const DEFAULT_BUSY_TIMEOUT: Duration = super::url::DEFAULT_SQLITE_BUSY_TIMEOUT;

/// The longest busy timeout: one day. Longer ones are cut to it.
pub const MAX_BUSY_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Expired rows are swept from the table once every this many writes.
const SWEEP_EVERY: u64 = 1024;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS cachelock_entries (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL,
    expires_at INTEGER
) WITHOUT ROWID";

/// A row is live at `now` if it has no expiry or expires after `now`.
const LIVE: &str = "(expires_at IS NULL OR expires_at > ?2)";

/// Which file a path names: device and inode (Unix). `None` where the
/// platform cannot tell, or the path names nothing.
type FileId = Option<(u64, u64)>;

fn file_id(path: &Path) -> FileId {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// The open connection and the file it has open.
#[derive(Debug)]
struct Open {
    conn: Connection,
    file: FileId,
}

#[derive(Debug)]
struct Inner {
    conn: Mutex<Open>,
    path: PathBuf,
    busy_timeout: Duration,
    writes: std::sync::atomic::AtomicU64,
}

/// The embedded cache backend kept in a SQLite file (feature `sqlite`).
///
/// Works across processes on one machine with nothing installed: every
/// process that opens the same file sees the same cache, and `add` and the
/// owner-checked token operations are atomic between them.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachelock::BackendError> {
/// use std::time::Duration;
/// use cachelock::{Backend, SqliteBackend};
///
/// let cache = SqliteBackend::open("/tmp/cachelock-example.sqlite3").await?;
/// cache.add("k", b"v", Duration::from_secs(5)).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub struct SqliteBackend {
    inner: Arc<Inner>,
    max_value_size: usize,
}

impl SqliteBackend {
    /// Opens (creating if needed) the cache file at `path`, with the
    /// [`DEFAULT_BUSY_TIMEOUT`]. The parent directory must exist.
    ///
    /// # Errors
    ///
    /// [`BackendError::Connect`] (naming the path) if the file cannot be
    /// opened or set up.
    pub async fn open(path: impl AsRef<Path>) -> BackendResult<Self> {
        Self::open_with_busy_timeout(path, DEFAULT_BUSY_TIMEOUT).await
    }

    /// Opens the cache file at `path`, waiting up to `busy_timeout` for
    /// other connections' write locks on every operation (at most
    /// [`MAX_BUSY_TIMEOUT`]; a longer one is cut to it, never a panic). A
    /// short timeout (say 100 ms) suits a caller that must not wait: one
    /// transaction holds the lock for microseconds.
    ///
    /// # Errors
    ///
    /// As for [`open`](Self::open).
    pub async fn open_with_busy_timeout(
        path: impl AsRef<Path>,
        busy_timeout: Duration,
    ) -> BackendResult<Self> {
        // SQLite takes the timeout as an `int` of milliseconds (rusqlite
        // panics on more).
        let busy_timeout = busy_timeout.min(MAX_BUSY_TIMEOUT);
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let open = tokio::task::spawn_blocking(move || open_conn(&p, busy_timeout))
            .await
            .map_err(|e| BackendError::connect(path.display().to_string(), e))??;
        Ok(Self {
            inner: Arc::new(Inner {
                conn: Mutex::new(open),
                path,
                busy_timeout,
                writes: std::sync::atomic::AtomicU64::new(0),
            }),
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
        })
    }

    /// Sets the largest value one item may hold. Defaults to
    /// [`DEFAULT_MAX_VALUE_SIZE`], like a default Memcached.
    #[must_use]
    pub fn with_max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// The path of the cache file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the connection on a blocking thread. `key` names the
    /// operation's key in errors.
    async fn run<T, F>(&self, key: &str, f: F) -> BackendResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, i64) -> rusqlite::Result<T> + Send + 'static,
    {
        self.run_or(key, None, f).await
    }

    /// Like [`run`](Self::run), but if the path no longer names the file
    /// that is open (it was deleted or replaced, say by a cache clean-up),
    /// answers `replaced` without running `f`, when it is given: an
    /// owner-checked operation's token was in the old file, which no other
    /// process will open again, so it is gone. Either way the path is opened
    /// afresh for the operations that follow.
    async fn run_or<T, F>(&self, key: &str, replaced: Option<T>, f: F) -> BackendResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, i64) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        let key_owned = key.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut open = inner.conn.lock();
            if open.file.is_some() && file_id(&inner.path) != open.file {
                tracing::warn!(
                    path = %inner.path.display(),
                    "the SQLite cache file was deleted or replaced; opening the path afresh \
                     (locks held in the old file are lost)"
                );
                let fresh = open_conn(&inner.path, inner.busy_timeout);
                match (fresh, replaced) {
                    (Ok(fresh), replaced) => {
                        *open = fresh;
                        if let Some(answer) = replaced {
                            return Ok(answer);
                        }
                    }
                    (Err(_), Some(answer)) => return Ok(answer),
                    (Err(e), None) => return Err(e),
                }
            }
            let now = now_ms();
            f(&mut open.conn, now).map_err(|e| map_err(&key_owned, inner.busy_timeout, e))
        })
        .await
        .map_err(|e| BackendError::unavailable(key, format!("SQLite worker thread failed: {e}")))?
    }

    /// Counts a write and, every [`SWEEP_EVERY`] writes, deletes expired
    /// rows so the file does not grow with dead keys.
    fn count_write(&self) {
        let n = self
            .inner
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % SWEEP_EVERY == SWEEP_EVERY - 1 {
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || {
                let open = inner.conn.lock();
                if let Err(e) = open.conn.execute(
                    "DELETE FROM cachelock_entries WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                    params![now_ms()],
                ) {
                    tracing::debug!(error = %e, "sweeping expired SQLite cache rows failed");
                }
            });
        }
    }
}

fn open_conn(path: &Path, busy_timeout: Duration) -> BackendResult<Open> {
    let name = path.display().to_string();
    // The error names the path once: as the backend it is about.
    let fail = |what: &str, e: rusqlite::Error| {
        // SQLite's own message may end with the path too.
        let e = e.to_string();
        let e = e.strip_suffix(&format!(": {name}")).unwrap_or(&e);
        BackendError::connect(
            name.clone(),
            format!("cannot {what} the SQLite cache file: {e}"),
        )
    };
    let conn = Connection::open(path).map_err(|e| fail("open", e))?;
    conn.busy_timeout(busy_timeout)
        .map_err(|e| fail("configure", e))?;
    // Switching a new file to WAL and creating the table need exclusive
    // access. When several processes open a new file at once, SQLite may
    // answer "database is locked" at once instead of calling the busy
    // handler (it does so to avoid deadlocks), so retry until the busy
    // timeout has passed.
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match set_up(&conn) {
            Ok(()) => {
                let file = file_id(path);
                return Ok(Open { conn, file });
            }
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                ) && start.elapsed() < busy_timeout =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(fail("set up", e)),
        }
    }
}

/// WAL mode (a property of the file), relaxed syncing (safe in WAL mode
/// against a crash of the application), and the table.
fn set_up(conn: &Connection) -> rusqlite::Result<()> {
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)
}

/// Milliseconds since the Unix epoch on the wall clock.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The expiry of an entry written at `now` with `ttl`, rounded up to whole
/// milliseconds; a zero TTL lives one millisecond, never forever.
fn expires_at(now: i64, ttl: Duration) -> i64 {
    let ms = ttl.as_nanos().div_ceil(1_000_000).max(1);
    now.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))
}

fn map_err(key: &str, busy_timeout: Duration, e: rusqlite::Error) -> BackendError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => BackendError::TimedOut {
            key: key.to_owned(),
            after: busy_timeout,
        },
        Some(
            ErrorCode::CannotOpen
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied
            | ErrorCode::DatabaseCorrupt
            | ErrorCode::NotADatabase,
        ) => BackendError::unavailable(key, format!("SQLite cache file: {e}")),
        _ => BackendError::protocol(key, format!("SQLite: {e}")),
    }
}

/// Reads the live value under `key`.
fn get_live(conn: &Connection, key: &str, now: i64) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.prepare_cached(&format!(
        "SELECT value FROM cachelock_entries WHERE key = ?1 AND {LIVE}"
    ))?
    .query_row(params![key, now], |r| r.get(0))
    .optional()
}

fn put(conn: &Connection, key: &str, value: &[u8], expires: Option<i64>) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO cachelock_entries (key, value, expires_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
    )?
    .execute(params![key, value, expires])?;
    Ok(())
}

/// What an owner-checked operation finds under `key`.
fn check_token(
    conn: &Connection,
    key: &str,
    expected: &[u8],
    now: i64,
) -> rusqlite::Result<TokenCheck> {
    Ok(match get_live(conn, key, now)? {
        None => TokenCheck::Missing,
        Some(v) if v != expected => TokenCheck::Mismatch,
        Some(_) => TokenCheck::Matched,
    })
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn get(&self, key: &str) -> BackendResult<Option<Bytes>> {
        let k = key.to_owned();
        self.run(key, move |conn, now| {
            Ok(get_live(conn, &k, now)?.map(Bytes::from))
        })
        .await
    }

    async fn get_many(&self, keys: &[&str]) -> BackendResult<Vec<Option<Bytes>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ks: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        let first = keys.first().copied().unwrap_or_default();
        self.run(first, move |conn, now| {
            // One read transaction, so the values come from one snapshot.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
            let out = ks
                .iter()
                .map(|k| Ok(get_live(&tx, k, now)?.map(Bytes::from)))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<()> {
        check_value_size(key, value, self.max_value_size())?;
        let (k, v) = (key.to_owned(), value.to_vec());
        self.run(key, move |conn, now| {
            put(conn, &k, &v, Some(expires_at(now, ttl)))
        })
        .await?;
        self.count_write();
        Ok(())
    }

    async fn set_many(&self, items: &[(&str, &[u8])], ttl: Duration) -> BackendResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        for (k, v) in items {
            check_value_size(k, v, self.max_value_size())?;
        }
        let owned: Vec<(String, Vec<u8>)> = items
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect();
        let first = items.first().map(|(k, _)| *k).unwrap_or_default();
        self.run(first, move |conn, now| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let exp = expires_at(now, ttl);
            for (k, v) in &owned {
                put(&tx, k, v, Some(exp))?;
            }
            tx.commit()
        })
        .await?;
        self.count_write();
        Ok(())
    }

    async fn add(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<bool> {
        check_value_size(key, value, self.max_value_size())?;
        let (k, v) = (key.to_owned(), value.to_vec());
        let added = self
            .run(key, move |conn, now| {
                // One statement: insert, or replace only a row that has
                // expired. SQLite runs it under the write lock, so of any
                // number of concurrent adds exactly one changes a row.
                let changed = conn
                    .prepare_cached(
                        "INSERT INTO cachelock_entries (key, value, expires_at) VALUES (?1, ?3, ?4)
                         ON CONFLICT (key) DO UPDATE
                         SET value = excluded.value, expires_at = excluded.expires_at
                         WHERE cachelock_entries.expires_at IS NOT NULL
                           AND cachelock_entries.expires_at <= ?2",
                    )?
                    .execute(params![k, now, v, expires_at(now, ttl)])?;
                Ok(changed == 1)
            })
            .await?;
        self.count_write();
        Ok(added)
    }

    /// The compare and the store in one immediate transaction.
    async fn set_if(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Duration,
    ) -> BackendResult<bool> {
        check_value_size(key, value, self.max_value_size())?;
        let (k, e, v) = (key.to_owned(), expected.map(<[u8]>::to_vec), value.to_vec());
        let stored = self
            .run(key, move |conn, now| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                if get_live(&tx, &k, now)? != e {
                    return Ok(false);
                }
                put(&tx, &k, &v, Some(expires_at(now, ttl)))?;
                tx.commit()?;
                Ok(true)
            })
            .await?;
        if stored {
            self.count_write();
        }
        Ok(stored)
    }

    /// The add and the increment in one immediate transaction.
    async fn add_fenced(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        _format: ValueFormat,
    ) -> BackendResult<Option<Grant>> {
        check_value_size(key, value, self.max_value_size())?;
        let (k, v, f) = (key.to_owned(), value.to_vec(), fence_key(key));
        let floor = fence_floor(SystemTime::now());
        let granted = self
            .run(key, move |conn, now| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                if get_live(&tx, &k, now)?.is_some() {
                    return Ok(None);
                }
                let counter = get_live(&tx, &f, now)?
                    .and_then(|c| std::str::from_utf8(&c).ok()?.parse::<u64>().ok())
                    .map_or(0, |n| n.saturating_add(1));
                let fence = next_fence(counter, floor);
                put(&tx, &k, &v, Some(expires_at(now, ttl)))?;
                put(
                    &tx,
                    &f,
                    fence.to_string().as_bytes(),
                    Some(expires_at(now, FENCE_TTL)),
                )?;
                tx.commit()?;
                Ok(Some(fence))
            })
            .await?;
        if granted.is_some() {
            self.count_write();
        }
        Ok(granted.map(|fence| Grant {
            fence,
            version: None,
        }))
    }

    async fn touch(&self, key: &str, ttl: Duration) -> BackendResult<bool> {
        let k = key.to_owned();
        self.run(key, move |conn, now| {
            let changed = conn
                .prepare_cached(&format!(
                    "UPDATE cachelock_entries SET expires_at = ?3 WHERE key = ?1 AND {LIVE}"
                ))?
                .execute(params![k, now, expires_at(now, ttl)])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn delete(&self, key: &str) -> BackendResult<bool> {
        let k = key.to_owned();
        self.run(key, move |conn, now| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existed = get_live(&tx, &k, now)?.is_some();
            tx.prepare_cached("DELETE FROM cachelock_entries WHERE key = ?1")?
                .execute(params![k])?;
            tx.commit()?;
            Ok(existed)
        })
        .await
    }

    async fn incr(&self, key: &str, delta: u64) -> BackendResult<u64> {
        let k = key.to_owned();
        let result = self
            .run(key, move |conn, now| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let row: Option<(Vec<u8>, Option<i64>)> = tx
                    .prepare_cached(&format!(
                        "SELECT value, expires_at FROM cachelock_entries WHERE key = ?1 AND {LIVE}"
                    ))?
                    .query_row(params![k, now], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let (new, expires) = match row {
                    None => (delta, None),
                    Some((v, expires)) => {
                        let current = std::str::from_utf8(&v)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok());
                        let Some(current) = current else {
                            return Ok(Err(
                                "cannot increment a value that is not a decimal number",
                            ));
                        };
                        let Some(new) = current.checked_add(delta) else {
                            return Ok(Err("increment would overflow a 64-bit counter"));
                        };
                        (new, expires)
                    }
                };
                put(&tx, &k, new.to_string().as_bytes(), expires)?;
                tx.commit()?;
                Ok(Ok(new))
            })
            .await?;
        self.count_write();
        result.map_err(|msg| BackendError::protocol(key, msg))
    }

    async fn delete_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        _hold: Duration,
    ) -> BackendResult<TokenCheck> {
        let (k, e) = (key.to_owned(), expected.to_vec());
        self.run_or(key, Some(TokenCheck::Missing), move |conn, now| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let check = check_token(&tx, &k, &e, now)?;
            if check == TokenCheck::Matched {
                tx.prepare_cached("DELETE FROM cachelock_entries WHERE key = ?1")?
                    .execute(params![k])?;
            }
            tx.commit()?;
            Ok(check)
        })
        .await
    }

    async fn extend_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        ttl: Duration,
    ) -> BackendResult<TokenCheck> {
        let (k, e) = (key.to_owned(), expected.to_vec());
        self.run_or(key, Some(TokenCheck::Missing), move |conn, now| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let check = check_token(&tx, &k, &e, now)?;
            if check == TokenCheck::Matched {
                tx.prepare_cached("UPDATE cachelock_entries SET expires_at = ?2 WHERE key = ?1")?
                    .execute(params![k, expires_at(now, ttl)])?;
            }
            tx.commit()?;
            Ok(check)
        })
        .await
    }

    async fn ttl(&self, key: &str) -> BackendResult<Option<Duration>> {
        let k = key.to_owned();
        self.run(key, move |conn, now| {
            let expires: Option<Option<i64>> = conn
                .prepare_cached(&format!(
                    "SELECT expires_at FROM cachelock_entries WHERE key = ?1 AND {LIVE}"
                ))?
                .query_row(params![k, now], |r| r.get(0))
                .optional()?;
            Ok(expires
                .flatten()
                .map(|t| Duration::from_millis(u64::try_from(t.saturating_sub(now)).unwrap_or(0))))
        })
        .await
    }

    async fn list(&self, prefix: &str, limit: usize) -> BackendResult<Vec<Listed>> {
        let p = prefix.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(prefix, move |conn, now| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT key, value, expires_at FROM cachelock_entries \
                 WHERE substr(key, 1, length(?1)) = ?1 AND {LIVE} ORDER BY key LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![p, now, limit], |r| {
                let key: String = r.get(0)?;
                let value: Vec<u8> = r.get(1)?;
                let expires: Option<i64> = r.get(2)?;
                Ok(Listed {
                    key,
                    value: Bytes::from(value),
                    ttl: expires.map(|t| {
                        Duration::from_millis(u64::try_from(t.saturating_sub(now)).unwrap_or(0))
                    }),
                })
            })?;
            rows.collect()
        })
        .await
    }

    fn atomic_token_ops(&self) -> bool {
        true
    }

    fn max_value_size(&self) -> usize {
        self.max_value_size
    }
}
