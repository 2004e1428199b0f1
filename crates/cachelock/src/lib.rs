//! Distributed locks and stampede-safe memoization kept in a cache.
//!
//! Hold one [`Cache`] handle per backend (as you would a connection pool):
//!
//! * [`Cache::lock`] gives a [`CacheLock`]: taken by an atomic add of a
//!   random token with a lease, released only by its holder;
//!   [`acquire`](CacheLock::acquire) waits, [`try_acquire`](CacheLock::try_acquire)
//!   does not, [`acquire_timeout`](CacheLock::acquire_timeout) waits at most
//!   that long;
//! * [`Cache::get_with`] / [`Cache::try_get_with`] / [`Cache::stream_with`]
//!   compute an expensive value once even when many callers, in this
//!   process or others, miss it at the same moment.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> cachelock::Result<()> {
//! use std::time::Duration;
//! use cachelock::{Cache, LockOptions, MemoryBackend};
//!
//! let cache = Cache::builder(MemoryBackend::new())          // or Cache::connect("redis://...")
//!     .lock(LockOptions::new().lease(Duration::from_secs(60)))
//!     .build()?;
//!
//! // One process at a time (the key is `cachelock:nightly-report`, as the CLI's).
//! let guard = cache.lock("nightly-report").acquire().await?;
//! // ... the work; guard.extend(None).await? renews the lease ...
//! let _released = guard.release().await?;                 // Released, Expired or Lost
//!
//! // Computed once however many callers miss it at the same moment.
//! let total: u64 = cache.get_with(("report", 2026, 11), || async { 40 + 2 }).await;
//! assert_eq!(total, 42);
//! cache.close().await;                                      // background releases done
//! # Ok(()) }
//! ```
//!
//! Backends and the Cargo features that bring them: the embedded
//! [`MemoryBackend`] (always; one process), Redis standalone and Cluster
//! (feature `redis`, on by default), Memcached (feature `memcached`, on by
//! default) and `SqliteBackend` (feature `sqlite`: one machine, many
//! processes), all behind one [`Backend`] trait. [`connect`] and
//! [`Cache::connect`] take a URL (`redis://`, `rediss://`,
//! `redis+cluster://`, `memcached://`, `sqlite://`, `memory://`).
//! Synchronous callers use [`Cache::blocking`] or [`blocking::connect`].
//!
//! A lock kept in a cache is *soft*: the cache may evict the key or lose it
//! on restart. cachelock detects that and reports it, but it cannot prevent
//! it; see the [`lock`] module docs.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod blocking;
mod error;
mod handle;
mod holder;
pub mod key;
pub mod lock;
pub mod memoize;

#[cfg(feature = "memcached")]
#[cfg_attr(docsrs, doc(cfg(feature = "memcached")))]
pub use backend::memcached::{MemcachedBackend, MemcachedOptions};
pub use backend::memory::MemoryBackend;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use backend::redis::{RedisBackend, RedisOptions};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use backend::sqlite::SqliteBackend;
pub use backend::url::{BackendUrl, SentinelUrl, connect};
pub use backend::{
    AddRead, Backend, FENCE_TTL, Grant, HANDOFF_CLAIM, Listed, LockAdd, Queued, SharedBackend,
    TokenCheck, ValueFormat, Version, fence_floor, fence_key,
};
pub use error::{BackendError, BackendResult, Error, Result};
pub use handle::{Cache, CacheBuilder, DEFAULT_NAMESPACE, Entry, IntoBackend};
pub use holder::Holder;
pub use key::{CacheKey, KeyBuilder};
pub use lock::{CacheLock, Compat, LockGuard, LockOptions, Lost, MAX_DURATION, Outcome, Released};
pub use memoize::{
    Compression, ENVELOPE_OVERHEAD, Expiration, MemoizeError, MemoizeStream, OnLockFailure, xfetch,
};
