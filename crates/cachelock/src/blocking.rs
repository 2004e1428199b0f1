//! The lock and memoize for synchronous callers.
//!
//! As `reqwest::blocking` does, these calls run the async implementation on
//! a small tokio runtime owned by cachelock (one worker thread, created on
//! first use and shared by the process), blocking the calling thread until
//! it is done. They work from a plain `fn main` and from any thread that is
//! not itself running async code; called from inside a tokio runtime they
//! return [`Error::InvalidConfig`] instead of blocking it (use the async API
//! there).
//!
//! ```
//! use std::sync::Arc;
//! use cachelock::{MemoizeOptions, MemoryBackend, SharedBackend, blocking};
//!
//! let cache: SharedBackend = Arc::new(MemoryBackend::new());
//! let v: u64 = blocking::memoize(&cache, "answer", &MemoizeOptions::new(), || {
//!     Ok::<_, std::io::Error>(42)
//! })
//! .unwrap();
//! assert_eq!(v, 42);
//! ```

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::runtime::{Handle, Runtime};

use crate::backend::SharedBackend;
use crate::error::{BackendError, Error, Result};
use crate::key::CacheKey;
use crate::lock::{LockOptions, Released, Wait};
use crate::memoize::{MemoizeError, MemoizeOptions, MemoizeStream};

static RUNTIME: LazyLock<std::result::Result<Runtime, String>> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("cachelock-blocking")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
});

/// Runs `fut` to completion on the shared runtime.
fn block_on<F: Future>(fut: F) -> Result<F::Output> {
    if Handle::try_current().is_ok() {
        return Err(Error::InvalidConfig(
            "cachelock::blocking was called from inside an async runtime; use the async API there"
                .into(),
        ));
    }
    match &*RUNTIME {
        Ok(rt) => Ok(rt.block_on(fut)),
        Err(e) => Err(Error::InvalidConfig(format!(
            "could not start cachelock's blocking runtime: {e}"
        ))),
    }
}

/// Runs any future to completion on cachelock's blocking runtime, for
/// what the facade does not wrap, such as connecting a backend, so that
/// its connections belong to the runtime the facade uses:
///
/// ```no_run
/// use std::sync::Arc;
/// use cachelock::{MemcachedBackend, SharedBackend, blocking};
///
/// let cache: SharedBackend =
///     Arc::new(blocking::run(MemcachedBackend::connect("memcached://127.0.0.1:11211")).unwrap()?);
/// # Ok::<(), cachelock::BackendError>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidConfig`] when called inside an async runtime or if the
/// runtime could not be started.
pub fn run<F: Future>(fut: F) -> Result<F::Output> {
    block_on(fut)
}

/// A blocking [`CacheLock`](crate::CacheLock).
#[derive(Debug, Clone)]
pub struct CacheLock {
    inner: crate::CacheLock,
}

impl CacheLock {
    /// As [`crate::CacheLock::new`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if the key is empty or the options invalid.
    pub fn new(
        backend: SharedBackend,
        key: impl Into<String>,
        options: LockOptions,
    ) -> Result<Self> {
        Ok(Self {
            inner: crate::CacheLock::new(backend, key, options)?,
        })
    }

    /// The full cache key of the lock.
    pub fn key(&self) -> &str {
        self.inner.key()
    }

    /// As [`crate::CacheLock::acquire`], blocking.
    ///
    /// # Errors
    ///
    /// As the async form, plus [`Error::InvalidConfig`] when called inside
    /// an async runtime.
    pub fn acquire(&self) -> Result<LockGuard> {
        self.acquire_with(self.inner.options().default_wait())
    }

    /// As [`crate::CacheLock::try_acquire`], blocking.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire).
    pub fn try_acquire(&self) -> Result<LockGuard> {
        self.acquire_with(Wait::NoWait)
    }

    /// As [`crate::CacheLock::acquire_timeout`], blocking.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire).
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<LockGuard> {
        self.acquire_with(Wait::Timeout(timeout))
    }

    /// As [`crate::CacheLock::acquire_with`], blocking.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire).
    pub fn acquire_with(&self, wait: Wait) -> Result<LockGuard> {
        let inner = block_on(self.inner.acquire_with(wait))??;
        Ok(LockGuard { inner: Some(inner) })
    }

    /// Runs `work` while holding the lock, then releases it (a release
    /// failure is logged).
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire).
    pub fn with_lock<T>(&self, work: impl FnOnce() -> T) -> Result<T> {
        let guard = self.acquire()?;
        let out = work();
        if let Err(e) = guard.release() {
            tracing::error!(key = %self.key(), error = %e, "failed to release cache lock");
        }
        Ok(out)
    }
}

/// A blocking [`LockGuard`](crate::LockGuard). Dropping it releases the
/// lock in the background on cachelock's runtime.
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard {
    inner: Option<crate::LockGuard>,
}

impl LockGuard {
    /// The full cache key of the lock.
    pub fn key(&self) -> &str {
        self.inner.as_ref().map_or("", |g| g.key())
    }

    /// The token stored under the key while we hold the lock.
    pub fn token(&self) -> &str {
        self.inner.as_ref().map_or("", |g| g.token())
    }

    /// Whether the lease is known to be gone.
    pub fn is_lost(&self) -> bool {
        self.inner.as_ref().is_none_or(|g| g.is_lost())
    }

    /// As [`crate::LockGuard::extend`], blocking.
    ///
    /// # Errors
    ///
    /// As the async form, plus [`Error::InvalidConfig`] when called inside
    /// an async runtime.
    pub fn extend(&mut self, lease: Option<Duration>) -> Result<()> {
        match self.inner.as_mut() {
            Some(g) => block_on(g.extend(lease))?,
            None => Err(Error::InvalidConfig(
                "the guard was already released".into(),
            )),
        }
    }

    /// As [`crate::LockGuard::release`], blocking.
    ///
    /// # Errors
    ///
    /// [`BackendError`] if the backend failed (or, as
    /// [`BackendError::Protocol`], if called inside an async runtime; the
    /// guard is then released in the background).
    pub fn release(mut self) -> std::result::Result<Released, BackendError> {
        let Some(g) = self.inner.take() else {
            return Ok(Released::Released);
        };
        let key = g.key().to_owned();
        match block_on(g.release()) {
            Ok(r) => r,
            Err(e) => Err(BackendError::protocol(key, e)),
        }
    }
}

/// [`crate::memoize()`] for synchronous callers: `compute` is a plain
/// closure, run on the calling thread.
///
/// # Errors
///
/// As [`crate::memoize()`]; [`MemoizeError::Config`] when called inside an
/// async runtime.
pub fn memoize<T, E, F>(
    cache: &SharedBackend,
    key: impl Into<CacheKey>,
    options: &MemoizeOptions,
    compute: F,
) -> std::result::Result<T, MemoizeError<E>>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    E: Send + 'static,
    F: FnOnce() -> std::result::Result<T, E>,
{
    let key = key.into();
    block_on(crate::memoize::memoize(cache, key, options, || async {
        compute()
    }))
    .map_err(MemoizeError::Config)?
}

/// [`crate::memoize_iter`] for synchronous callers: a blocking iterator.
/// Dropping it early releases the lock and caches nothing.
pub fn memoize_iter<T, E, I>(
    cache: &SharedBackend,
    key: impl Into<CacheKey>,
    options: &MemoizeOptions,
    items: I,
) -> MemoizeIter<T, E>
where
    T: Serialize + DeserializeOwned + Send + 'static,
    E: Send + 'static,
    I: IntoIterator<Item = std::result::Result<T, E>>,
    I::IntoIter: Send + 'static,
{
    MemoizeIter {
        stream: Some(crate::memoize::memoize_iter(cache, key, options, items)),
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Drop the async guard inside cachelock's runtime, so its release
        // is spawned there.
        if let Some(g) = self.inner.take() {
            match &*RUNTIME {
                Ok(rt) => {
                    let _enter = rt.enter();
                    drop(g);
                }
                Err(_) => drop(g),
            }
        }
    }
}

/// The blocking iterator returned by [`memoize_iter`].
#[derive(Debug)]
pub struct MemoizeIter<T, E> {
    stream: Option<MemoizeStream<T, E>>,
}

impl<T, E> Iterator for MemoizeIter<T, E> {
    type Item = std::result::Result<T, MemoizeError<E>>;

    fn next(&mut self) -> Option<Self::Item> {
        let stream = self.stream.as_mut()?;
        match block_on(stream.next()) {
            Ok(Some(item)) => Some(item),
            Ok(None) => {
                self.stream = None;
                None
            }
            Err(e) => {
                self.stream = None;
                Some(Err(MemoizeError::Config(e)))
            }
        }
    }
}

impl<T, E> Drop for MemoizeIter<T, E> {
    fn drop(&mut self) {
        // Drop the stream inside the runtime, so a lock it holds is released
        // there.
        if let (Some(stream), Ok(rt)) = (self.stream.take(), &*RUNTIME) {
            let _enter = rt.enter();
            drop(stream);
        }
    }
}
