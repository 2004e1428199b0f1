//! Distributed locks and stampede-safe memoization kept in a cache.
//!
//! cachelock lets many processes on many machines share one cache safely:
//!
//! * [`CacheLock`]: a lock taken by an atomic add of a random token with a
//!   lease, released only by its holder;
//! * [`memoize()`] / [`memoize_stream`]: compute an expensive value once even when many callers miss it
//!   at the same moment.
//!
//! Backends: the embedded [`MemoryBackend`] (no server needed), `SqliteBackend` (feature `sqlite`: one machine, many processes), Redis
//! (standalone and Cluster) and Memcached (one or many servers), all behind
//! one [`Backend`] trait.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> cachelock::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use cachelock::{CacheLock, KeyBuilder, LockOptions, MemoryBackend};
//!
//! let cache = Arc::new(MemoryBackend::new());
//! let keys = KeyBuilder::new("example.com");
//! let lock = CacheLock::new(
//!     cache,
//!     keys.build("nightly-report"),
//!     LockOptions::new().lease(Duration::from_secs(60)),
//! )?;
//!
//! let report = lock.with_lock(|| async { "built once" }).await?;
//! assert_eq!(report, "built once");
//! # Ok(()) }
//! ```
//!
//! Memoize an expensive value: on a miss one caller computes it under the
//! lock while every other caller (in this process or any other) waits for
//! the value and reads it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::Arc;
//! use cachelock::{LockOptions, MemoizeOptions, MemoryBackend, SharedBackend, memoize};
//!
//! let cache: SharedBackend = Arc::new(MemoryBackend::new());
//! let options = MemoizeOptions::new().lock(LockOptions::default());
//! let total: u64 = memoize(&cache, ("report", "2026-11"), &options, || async {
//!     Ok::<_, std::io::Error>(40 + 2) // the expensive part
//! })
//! .await
//! .unwrap();
//! assert_eq!(total, 42);
//! # }
//! ```
//!
//! Synchronous callers use [`blocking`]; [`connect`] builds a backend from a
//! URL (`redis://`, `redis+cluster://`, `memcached://`, `sqlite://`,
//! `memory://`).
//!
//! A lock kept in a cache is *soft*: the cache may evict the key or lose it
//! on restart. cachelock detects that and reports it, but it cannot prevent
//! it; see the [`lock`] module docs.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod blocking;
mod error;
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
pub use backend::url::{BackendUrl, connect};
pub use backend::{Backend, SharedBackend, TokenCheck};
pub use error::{BackendError, BackendResult, Error, Result};
pub use key::{CacheKey, KeyBuilder};
pub use lock::{CacheLock, LockGuard, LockOptions, Released, Wait};
pub use memoize::{
    Compression, MemoizeError, MemoizeOptions, MemoizeStream, OnLockTimeout, memoize, memoize_iter,
    memoize_stream,
};
