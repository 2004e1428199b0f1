//! The storage contract every cache backend implements.
//!
//! [`Backend`] is a small set of async cache operations. The lock and memoize
//! algorithms live elsewhere in the crate and use only this trait, the way
//! governor keeps its `StateStore` apart from the GCRA algorithm.
//!
//! # What an implementor must guarantee
//!
//! * [`add`](Backend::add) is **atomic**: of any number of concurrent `add`s
//!   of one absent key, exactly one returns `true`. The lock is built on this.
//! * A TTL is honoured: once it has passed, the key reads as absent.
//!   A TTL is never turned into "never expires" (Memcached's `0`). Backends
//!   with a coarser clock round **up**.
//! * [`delete_if_eq`](Backend::delete_if_eq) and
//!   [`extend_if_eq`](Backend::extend_if_eq) should be atomic (a server-side
//!   compare-and-delete / compare-and-extend). A backend that implements them
//!   atomically says so with [`atomic_token_ops`](Backend::atomic_token_ops).
//!   The provided default methods are the original Djblets fallback (touch,
//!   then get and compare, then delete), which has a window in which another
//!   holder's lock can be deleted; it exists for backends with no atomic form.
//! * Values are opaque bytes. Keys are UTF-8 strings as built by
//!   [`KeyBuilder`](crate::KeyBuilder); a backend that cannot store a key as
//!   given must encode it (never silently truncate it) or refuse it with
//!   [`BackendError::InvalidKey`](crate::BackendError::InvalidKey).
//!
//! # Backends and Cargo features
//!
//! | feature | default | backend | URL schemes ([`connect`](crate::connect)) |
//! |---|---|---|---|
//! | (none) | always | [`memory::MemoryBackend`], in this process only | `memory://` |
//! | `redis` | yes | `redis::RedisBackend`: standalone, TLS, Unix socket, Cluster | `redis://`, `rediss://`, `redis+unix://`, `redis+cluster://`, `rediss+cluster://` |
//! | `memcached` | yes | `memcached::MemcachedBackend`: meta protocol, one or many servers | `memcached://` |
//! | `sqlite` | no | `sqlite::SqliteBackend`: one file shared by the processes of one machine | `sqlite:///absolute/path` |
//!
//! A URL whose backend this build leaves out is refused by
//! [`connect`](crate::connect) with
//! [`BackendError::InvalidUrl`](crate::BackendError::InvalidUrl), naming the
//! feature to enable.
//!
//! Errors name the key. [`BackendError::Unavailable`](crate::BackendError::Unavailable) and
//! [`BackendError::TimedOut`](crate::BackendError::TimedOut) mean "the operation may or may not have
//! happened"; callers that care (the lock) re-check instead of repeating it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BackendResult;
pub use notify::ReleaseWatch;

pub mod django;
#[cfg(feature = "memcached")]
#[cfg_attr(docsrs, doc(cfg(feature = "memcached")))]
pub mod memcached;
pub mod memory;
pub mod notify;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod sqlite;
pub mod url;

/// Memcached's default item size limit less 1 KiB of item overhead: the
/// Djblets `CACHE_CHUNK_SIZE`. Used when a backend does not know better.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 1_047_552;

/// Refuses a value larger than `limit` with [`BackendError::ValueTooLarge`](crate::BackendError::ValueTooLarge),
/// before anything is sent.
pub(crate) fn check_value_size(key: &str, value: &[u8], limit: usize) -> BackendResult<()> {
    if value.len() > limit {
        return Err(crate::BackendError::ValueTooLarge {
            key: key.to_owned(),
            size: value.len(),
            limit,
        });
    }
    Ok(())
}

/// What an owner-checked operation found under the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenCheck {
    /// The key held the expected value, and the operation was done.
    Matched,
    /// The key holds another value: it belongs to someone else now.
    /// Nothing was changed.
    Mismatch,
    /// The key is absent (expired, evicted, deleted, or the server lost it).
    /// Nothing was changed.
    Missing,
}

/// How a lock's token is stored, chosen by the lock's
/// [`Compat`](crate::Compat) mode. Each backend decides what the format
/// means on its server ([`Backend::encode_lock_value`],
/// [`Backend::add_fenced`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ValueFormat {
    /// The token's bytes as they are (cachelock's own format).
    #[default]
    Raw,
    /// As Django's cache stores a Python `str`, so that djblets'
    /// `CacheLock` can read it: pickled (see [`django`]) by default, on
    /// Memcached UTF-8 text with client flags 16 (`PyMemcacheCache`).
    DjangoStr,
}

/// The key of the wait queue of lock `key`. `\q` ends no key the key
/// builder makes (it writes every backslash as `\x5c`).
pub(crate) fn queue_key(key: &str) -> String {
    format!("{key}\\q")
}

/// What a lock's [`add_fenced`](Backend::add_fenced) got when it stored its
/// value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Grant {
    /// The fencing number of this grant: larger than that of every earlier
    /// grant of the same key (best effort; see [`fence_floor`]).
    pub fence: u64,
    /// The backend's version of the stored value (Memcached: its CAS and
    /// the connection it is valid on), if it has one; handed back to
    /// [`delete_if_version`](Backend::delete_if_version) and
    /// [`extend_if_version`](Backend::extend_if_version) so that they can
    /// skip the read.
    pub version: Option<Version>,
}

/// What a waiter's [`add_queued`](Backend::add_queued) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queued {
    /// The lock is ours.
    Granted(Grant),
    /// Someone else holds it (the waiter is in line where the backend keeps
    /// a queue).
    Held {
        /// Where releases hand the lock straight to the first waiter in line
        /// (a standalone Redis): the fence of the latest grant when the
        /// attempt ran (0 if none is known). A hand-off notice naming this
        /// waiter with a larger fence comes from a release after this
        /// attempt; one with a fence not above it is older, and the lock
        /// it gave may be gone. `None` where the backend does not say.
        latest_fence: Option<u64>,
    },
}

impl From<Option<Grant>> for Queued {
    /// The outcome of an add that keeps no queue: granted, or held (no
    /// fence known).
    fn from(grant: Option<Grant>) -> Self {
        match grant {
            Some(grant) => Self::Granted(grant),
            None => Self::Held { latest_fence: None },
        }
    }
}

/// Which of the lock's adds [`Backend::add_reading`] makes: the one the
/// lock would make on its own for the same attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockAdd {
    /// [`add_fenced`](Backend::add_fenced), with the value in this format
    /// (a single attempt, or any attempt in Django mode).
    Fenced(ValueFormat),
    /// [`add_queued`](Backend::add_queued) (a waiter, in cachelock's own
    /// format).
    Queued,
}

/// What [`Backend::add_reading`] got: the add's outcome, and the keys as
/// read after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddRead {
    /// The add's outcome, as the add alone returns it.
    pub outcome: Queued,
    /// One entry per key asked for, in order (`None`: absent), as
    /// [`get_many`](Backend::get_many) returns them; or the read's error.
    /// The add's outcome stands either way.
    pub values: BackendResult<Vec<Option<Bytes>>>,
}

/// A backend's version of a value it stored for a lock: what lets an
/// owner-checked operation skip reading the value back. Only the backend
/// that made it knows what it means; pass it back to that same backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    /// The version number (Memcached: the item's CAS).
    pub value: u64,
    /// Where the number can be trusted (Memcached: the sequence number of
    /// the connection the value was stored over).
    pub session: u64,
}

/// The longest a release hands the lock to a waiter in line for
/// ([`Backend::add_queued`]): the waiter, which holds the lock on the notice
/// without another command, extends it to its own lease at once. A waiter
/// whose process crashed in line so holds the lock for this long, not for
/// its whole lease.
pub const HANDOFF_CLAIM: Duration = Duration::from_secs(1);

/// How long a fence counter lives after the last grant it numbered: one day.
/// When it is gone (this TTL, eviction, a flush, a restart) the next grant
/// starts again from [`fence_floor`], so letting it expire costs nothing and
/// keeps memory bounded.
pub const FENCE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The lowest fence a grant at wall-clock time `now` gets: microseconds since
/// the Unix epoch. A counter that was lost restarts from here, above every
/// number it handed out before, as long as grants came no faster than one a
/// microsecond on average and the clock did not step back.
pub fn fence_floor(now: SystemTime) -> u64 {
    now.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The key of the fence counter that numbers the grants of lock `key`.
///
/// It lands in the same Redis Cluster hash slot as `key` (so one script can
/// touch both): `key:fence` if `key` has a hash tag, `{key}:fence` if it
/// has none and no `}`. Only for a key with a `}` and no hash tag is it
/// plain `key:fence`, in another slot.
pub fn fence_key(key: &str) -> String {
    if has_hash_tag(key) || key.contains('}') {
        format!("{key}:fence")
    } else {
        format!("{{{key}}}:fence")
    }
}

/// Whether `key` has a Redis Cluster hash tag: a `{` followed later by a
/// `}` with at least one byte between them.
pub(crate) fn has_hash_tag(key: &str) -> bool {
    key.find('{')
        .and_then(|open| key.get(open + 1..))
        .and_then(|rest| rest.find('}'))
        .is_some_and(|len| len > 0)
}

/// Whether [`fence_key`] of `key` is in `key`'s Cluster hash slot.
pub(crate) fn fence_key_same_slot(key: &str) -> bool {
    has_hash_tag(key) || !key.contains('}')
}

/// The fence of a grant whose counter reads `counter` after its increment:
/// the counter, or the floor if the counter restarted below it.
pub(crate) fn next_fence(counter: u64, floor: u64) -> u64 {
    counter.max(floor)
}

/// An async cache: the storage contract the lock and memoize are built on.
///
/// Use it as `Arc<dyn Backend>` (see [`SharedBackend`]); all methods take
/// `&self` and every implementation is `Send + Sync`.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Reads one key. `Ok(None)` if it is absent or expired.
    async fn get(&self, key: &str) -> BackendResult<Option<Bytes>>;

    /// Reads several keys. The result has one entry per key, in order, with
    /// `None` for each key that is absent ("holes").
    async fn get_many(&self, keys: &[&str]) -> BackendResult<Vec<Option<Bytes>>>;

    /// Stores a value with a TTL, replacing any value.
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<()>;

    /// Stores several values with one TTL. Not atomic as a whole: on error,
    /// some of the items may have been stored.
    async fn set_many(&self, items: &[(&str, &[u8])], ttl: Duration) -> BackendResult<()>;

    /// Stores a value only if the key is absent. Returns whether it was
    /// stored. **Atomic**: the lock relies on it.
    async fn add(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<bool>;

    /// The add of a waiter that will wait for lock `key` if it is held: as
    /// [`add_fenced`](Backend::add_fenced) (a [`ValueFormat::Raw`] value),
    /// and where the backend keeps a wait queue (a standalone Redis), a
    /// failed add puts the waiter (by `value` and its lease `ttl`) at the
    /// end of the queue. A release then hands the lock straight to the
    /// first in line: it stores that waiter's value with a TTL of the
    /// waiter's lease or [`HANDOFF_CLAIM`], whichever is shorter, numbers
    /// the grant, and its notice names the waiter and the fence
    /// ([`ReleaseWatch::handed_to_us`]); the waiter holds the lock from then
    /// on without another command, and extends it to its lease at once (so
    /// a waiter that crashed in line holds it for the claim only). A waiter
    /// whose notice was
    /// lost finds the lock holding its value at its next attempt, which
    /// then returns the grant. The default is `add_fenced`.
    async fn add_queued(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<Queued> {
        Ok(
            match self.add_fenced(key, value, ttl, ValueFormat::Raw).await? {
                Some(grant) => Queued::Granted(grant),
                None => Queued::Held { latest_fence: None },
            },
        )
    }

    /// Takes the waiter `value` (queued with lease `ttl`) out of `key`'s
    /// wait queue (it stopped waiting), and if a release already handed it
    /// the lock, gives the lock up as a release does (to the next in line),
    /// so that no one holds it for a waiter that is gone. The default does
    /// nothing.
    async fn leave_queue(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<()> {
        let _ = (key, value, ttl);
        Ok(())
    }

    /// Compare-and-set: stores `value` under `key` with `ttl` only if the
    /// key holds exactly `expected` now, or is absent when `expected` is
    /// `None`. Returns whether it stored. Memoize's fenced write-back and
    /// soft invalidation are built on it.
    ///
    /// The default is **not atomic**: [`add`](Backend::add) for `None`,
    /// else a [`get`](Backend::get), a compare and a [`set`](Backend::set),
    /// so a write landing between the read and the set is overwritten. The
    /// backends of this crate override it with an atomic form (Redis: a
    /// script, falling back to this default where the server denies
    /// scripts).
    ///
    /// # Errors
    ///
    /// What [`get`](Backend::get) and [`set`](Backend::set) can fail with.
    /// After [`BackendError::Unavailable`](crate::BackendError::Unavailable)
    /// or [`BackendError::TimedOut`](crate::BackendError::TimedOut) the
    /// value may or may not have been stored.
    async fn set_if(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Duration,
    ) -> BackendResult<bool> {
        let Some(expected) = expected else {
            return self.add(key, value, ttl).await;
        };
        match self.get(key).await? {
            Some(v) if v.as_ref() == expected => {
                self.set(key, value, ttl).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Sets a new TTL on an existing key. Returns `false` if the key is absent.
    async fn touch(&self, key: &str, ttl: Duration) -> BackendResult<bool>;

    /// Deletes a key. Returns whether it existed.
    async fn delete(&self, key: &str) -> BackendResult<bool>;

    /// Adds `delta` to the decimal number stored under `key` and returns the
    /// new value. An absent key is created holding `delta`, with no TTL of
    /// its own on Redis and the embedded backends and Memcached's "no
    /// expiry". A value that is not a decimal number is a
    /// [`BackendError::Protocol`](crate::BackendError::Protocol) error.
    async fn incr(&self, key: &str, delta: u64) -> BackendResult<u64>;

    /// Deletes `key` only if it holds `expected`.
    ///
    /// `hold` is used only by this default, non-atomic fallback (the
    /// original's release): it touches the key with `hold` so that it stays
    /// alive while it is read, reads it, and deletes it if it matches. Between
    /// that read and the delete another client could take the key over and
    /// lose it to us. Backends with a server-side compare-and-delete override
    /// this method, ignore `hold`, and return `true` from
    /// [`atomic_token_ops`](Backend::atomic_token_ops).
    async fn delete_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        hold: Duration,
    ) -> BackendResult<TokenCheck> {
        if !self.touch(key, hold).await? {
            return Ok(TokenCheck::Missing);
        }
        match self.get(key).await? {
            None => Ok(TokenCheck::Missing),
            Some(v) if v.as_ref() != expected => Ok(TokenCheck::Mismatch),
            Some(_) => {
                self.delete(key).await?;
                Ok(TokenCheck::Matched)
            }
        }
    }

    /// The lock's add: stores `value` under `key` if it is absent, as
    /// [`add`](Backend::add) does, and if it stored it, numbers the grant
    /// with the next fence of the counter under [`fence_key`] (never below
    /// [`fence_floor`]; the counter lives [`FENCE_TTL`]). `Ok(None)`: the key
    /// is held.
    ///
    /// When it returns `Ok`, and whenever `value` is found under `key`
    /// afterwards, the counter holds the grant's fence or more (the lock
    /// takes [`fence`](Backend::fence) as its number when the reply of this
    /// call was lost but the key reads back as ours).
    ///
    /// `value` was made by [`encode_lock_value`](Backend::encode_lock_value)
    /// in `format`; Memcached stores a [`ValueFormat::DjangoStr`] with
    /// client flags 16, the others ignore `format`.
    ///
    /// The default adds, then increments (two or three round trips; the
    /// increment happens while the lock is held, so the numbers still rise in
    /// grant order; if it fails, the add is undone). Backends override it to
    /// do both in one step.
    async fn add_fenced(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        format: ValueFormat,
    ) -> BackendResult<Option<Grant>> {
        let _ = format;
        match self.add(key, value, ttl).await {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            // The reply was lost: if the add went through, number it.
            Err(e) if e.is_unavailable() => match self.get(key).await {
                Ok(Some(v)) if v.as_ref() == value => {}
                _ => return Err(e),
            },
            Err(e) => return Err(e),
        }
        let counter_key = fence_key(key);
        let numbered = async {
            let counter = self.incr(&counter_key, 1).await?;
            let fence = next_fence(counter, fence_floor(SystemTime::now()));
            if fence > counter {
                self.set(&counter_key, fence.to_string().as_bytes(), FENCE_TTL)
                    .await?;
            } else {
                self.touch(&counter_key, FENCE_TTL).await?;
            }
            Ok(fence)
        };
        match numbered.await {
            Ok(fence) => Ok(Some(Grant {
                fence,
                version: None,
            })),
            // Not numbered: give the lock back, so that a caller that reads
            // the key back does not take it with the counter's old number.
            Err(e) => {
                let _ = self.delete_if_eq(key, value, ttl).await;
                Err(e)
            }
        }
    }

    /// The lock's add ([`add_fenced`](Backend::add_fenced) or
    /// [`add_queued`](Backend::add_queued), as `add` says), then a read of
    /// `keys`, in one round trip where the backend can: memoize takes its
    /// lock and reads the value (which another process may have just
    /// written) together.
    ///
    /// The read is made after the add: a key written before the add was
    /// made (before the lock's previous holder released it, say) reads as
    /// written. Backends that spread keys over servers read a key that
    /// lives on another server than `key` concurrently with the add
    /// (Memcached), so for those keys the read is only as recent as the
    /// moment the request was sent.
    ///
    /// The default makes the two calls in sequence (two round trips; the
    /// in-memory and SQLite backends). Redis runs one script where all keys
    /// share the lock key's hash slot (always, off a Cluster) and scripts
    /// are allowed; Memcached pipelines the `mg`s behind the add.
    ///
    /// # Errors
    ///
    /// What the add fails with: then its outcome is unknown, as for the
    /// add alone. A failed read after a known add outcome is in
    /// [`AddRead::values`].
    async fn add_reading(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        add: LockAdd,
        keys: &[&str],
    ) -> BackendResult<AddRead> {
        add_then_read(self, key, value, ttl, add, keys).await
    }

    /// The fence of the latest grant of lock `key` (the current holder's,
    /// while it is held). `Ok(None)`: no counter (never granted, or lost).
    async fn fence(&self, key: &str) -> BackendResult<Option<u64>> {
        let counter_key = fence_key(key);
        Ok(self
            .get(&counter_key)
            .await?
            .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse().ok()))
    }

    /// [`delete_if_eq`](Backend::delete_if_eq) given also the version the
    /// value had when we stored it ([`Grant::version`]). The default ignores
    /// the version; Memcached deletes by CAS in one round trip and reads
    /// only when the CAS no longer matches.
    async fn delete_if_version(
        &self,
        key: &str,
        expected: &[u8],
        version: Option<Version>,
        hold: Duration,
    ) -> BackendResult<TokenCheck> {
        let _ = version;
        self.delete_if_eq(key, expected, hold).await
    }

    /// [`extend_if_eq`](Backend::extend_if_eq) given also the value's
    /// version; returns the value's new version, to be passed next time.
    /// The default ignores the version and returns it unchanged.
    async fn extend_if_version(
        &self,
        key: &str,
        expected: &[u8],
        version: Option<Version>,
        ttl: Duration,
    ) -> BackendResult<(TokenCheck, Option<Version>)> {
        let check = self.extend_if_eq(key, expected, ttl).await?;
        Ok((check, version))
    }

    /// Sets a new TTL on `key` only if it holds `expected`.
    ///
    /// The default is the non-atomic fallback (read, compare, touch);
    /// backends with a server-side form override it.
    async fn extend_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        ttl: Duration,
    ) -> BackendResult<TokenCheck> {
        match self.get(key).await? {
            None => Ok(TokenCheck::Missing),
            Some(v) if v.as_ref() != expected => Ok(TokenCheck::Mismatch),
            Some(_) => Ok(if self.touch(key, ttl).await? {
                TokenCheck::Matched
            } else {
                TokenCheck::Missing
            }),
        }
    }

    /// The remaining TTL of `key`, where the backend can tell. `Ok(None)`
    /// means absent, or that the backend cannot say.
    async fn ttl(&self, key: &str) -> BackendResult<Option<Duration>> {
        let _ = key;
        Ok(None)
    }

    /// Up to `limit` live keys that start with `prefix`, with their values
    /// and remaining TTLs, in no set order: what `cachelock list` shows.
    /// An administrative listing only; the lock and memoize never call it.
    /// Not a snapshot: keys that come or go meanwhile may be missed. Redis
    /// walks the keyspace with `SCAN` (every master of a Cluster), which
    /// costs time in proportion to the whole keyspace, not to the matches.
    ///
    /// # Errors
    ///
    /// [`BackendError::Unsupported`](crate::BackendError::Unsupported)
    /// where the backend cannot list its keys (the default; Memcached has
    /// no way to); otherwise what [`get`](Backend::get) can fail with.
    async fn list(&self, prefix: &str, limit: usize) -> BackendResult<Vec<Listed>> {
        let _ = (prefix, limit);
        Err(crate::BackendError::Unsupported {
            backend: "this backend".to_owned(),
            operation: "list its keys".to_owned(),
        })
    }

    /// Arms a wake-up for the next release of `key` (see
    /// [`crate::backend::notify`]). The lock arms one before each
    /// attempt, so a release between the attempt and the wait is not lost.
    ///
    /// The default returns [`ReleaseWatch::polling`]: waiters poll with a
    /// capped, jittered backoff (Memcached, SQLite). The embedded backend
    /// notifies in process; Redis through pub/sub (one subscriber
    /// connection per backend for all its waiters).
    async fn watch_release(&self, key: &str) -> ReleaseWatch {
        let _ = key;
        ReleaseWatch::polling()
    }

    /// A wake-up for the next release of `key` if one can be armed without
    /// I/O (Redis: this backend's subscriber already listens for `key`),
    /// else `None` (the default). A waiter arms it before its first attempt,
    /// which saves the second attempt it otherwise sends right after arming
    /// [`watch_release`](Backend::watch_release).
    fn watch_release_now(&self, key: &str) -> Option<ReleaseWatch> {
        let _ = key;
        None
    }

    /// When this process last released `key` while others were waiting
    /// for it, if the backend can tell (the default: `None`). The lock
    /// gives those woken waiters a short grace before it lets this process
    /// take the key again, so that a releasing holder does not starve them.
    fn handed_off_at(&self, key: &str) -> Option<tokio::time::Instant> {
        let _ = key;
        None
    }

    /// The bytes a lock stores for its token `text` in `format`. The
    /// default writes [`ValueFormat::DjangoStr`] as a pickled `str` (Django's
    /// Redis, database and local-memory caches pickle every value).
    fn encode_lock_value(&self, text: &str, format: ValueFormat) -> Bytes {
        match format {
            ValueFormat::Raw => Bytes::copy_from_slice(text.as_bytes()),
            ValueFormat::DjangoStr => Bytes::from(django::pickle_str(text)),
        }
    }

    /// The token in a lock value read back, if it has the shape `format`
    /// writes (for any holder: a djblets token is read the same way). The
    /// inverse of [`encode_lock_value`](Backend::encode_lock_value);
    /// `None` for anything else. Never unpickles anything but one `str`.
    fn decode_lock_value(&self, value: &[u8], format: ValueFormat) -> Option<String> {
        match format {
            ValueFormat::Raw => String::from_utf8(value.to_vec()).ok(),
            ValueFormat::DjangoStr => django::unpickle_str(value),
        }
    }

    /// Whether [`delete_if_eq`](Backend::delete_if_eq) and
    /// [`extend_if_eq`](Backend::extend_if_eq) are atomic on the server.
    fn atomic_token_ops(&self) -> bool {
        false
    }

    /// Whether a value this backend returns is always within its TTL as
    /// measured on this process's [`tokio::time`] clock, to the
    /// millisecond (the default: `false`; the embedded backend: `true`).
    /// A memoize hit on a value whose fresh time is its whole TTL then
    /// needs no clock read of its own: the backend's expiry check was the
    /// freshness check.
    fn exact_expiry(&self) -> bool {
        false
    }

    /// The largest value, in bytes, that one item may hold. Memoize splits
    /// larger values into chunks of at most this size.
    fn max_value_size(&self) -> usize {
        DEFAULT_MAX_VALUE_SIZE
    }
}

/// [`Backend::add_reading`] in two steps: the add, then a
/// [`get_many`](Backend::get_many) of `keys`.
pub(crate) async fn add_then_read<B: Backend + ?Sized>(
    backend: &B,
    key: &str,
    value: &[u8],
    ttl: Duration,
    add: LockAdd,
    keys: &[&str],
) -> BackendResult<AddRead> {
    let outcome = match add {
        LockAdd::Fenced(format) => backend.add_fenced(key, value, ttl, format).await?.into(),
        LockAdd::Queued => backend.add_queued(key, value, ttl).await?,
    };
    Ok(AddRead {
        outcome,
        values: backend.get_many(keys).await,
    })
}

/// A key found by [`Backend::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The full cache key.
    pub key: String,
    /// Its value (untrusted: whatever is stored).
    pub value: Bytes,
    /// Its remaining TTL; `None`: no expiry, or the backend cannot say.
    pub ttl: Option<Duration>,
}

/// A backend shared between locks, memoize calls and tasks.
pub type SharedBackend = Arc<dyn Backend>;
