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
use std::time::Duration;

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
/// [`Backend::add_lock_value`]).
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

    /// The add of a waiter that will wait for `key` if it is held: as
    /// [`add`](Backend::add), and where the backend keeps a wait queue (a
    /// standalone Redis), a failed add puts the waiter (by `value`) at the
    /// end of the queue, and a release then hands the lock to the first in
    /// line (it is reserved for that waiter, and the release notice names
    /// it; see [`ReleaseWatch::handed_to_other`]). The default is `add`.
    async fn add_queued(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<bool> {
        self.add(key, value, ttl).await
    }

    /// Takes the waiter `value` out of `key`'s wait queue (it stopped
    /// waiting). The default does nothing.
    async fn leave_queue(&self, key: &str, value: &[u8]) -> BackendResult<()> {
        let _ = (key, value);
        Ok(())
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

    /// Arms a wake-up for the next release of `key` (see
    /// [`notify`](crate::backend::notify)). The lock arms one before each
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

    /// The lock's atomic [`add`](Backend::add) of a value made by
    /// [`encode_lock_value`](Backend::encode_lock_value) in `format`. The
    /// default is `add`; Memcached sets client flags 16 for
    /// [`ValueFormat::DjangoStr`].
    async fn add_lock_value(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        format: ValueFormat,
    ) -> BackendResult<bool> {
        let _ = format;
        self.add(key, value, ttl).await
    }

    /// Whether [`delete_if_eq`](Backend::delete_if_eq) and
    /// [`extend_if_eq`](Backend::extend_if_eq) are atomic on the server.
    fn atomic_token_ops(&self) -> bool {
        false
    }

    /// The largest value, in bytes, that one item may hold. Memoize splits
    /// larger values into chunks of at most this size.
    fn max_value_size(&self) -> usize {
        DEFAULT_MAX_VALUE_SIZE
    }
}

/// A backend shared between locks, memoize calls and tasks.
pub type SharedBackend = Arc<dyn Backend>;
