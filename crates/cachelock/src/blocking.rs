//! The handle, the lock and memoize for synchronous callers.
//!
//! These calls run the async implementation on the calling thread, with a
//! small tokio runtime owned by cachelock (one worker thread, created on
//! first use and shared by the process) driving its timers and sockets.
//! They work from a plain `fn main`, from any thread, and from
//! `tokio::task::spawn_blocking` on a multi-thread runtime.
//!
//! A call is refused with [`Error::BlockingRefused`] (nothing done) only
//! where blocking could deadlock: on a thread of a current-thread tokio
//! runtime (blocking its only thread would stop the runtime that may be
//! driving the backend's connections), and on cachelock's own runtime
//! thread. Use the async API there.
//!
//! ```
//! use cachelock::{MemoryBackend, blocking};
//!
//! let cache = cachelock::Cache::builder(MemoryBackend::new()).build()?.blocking();
//! let v: u64 = cache.get_with("answer", || 42)?;
//! assert_eq!(v, 42);
//! let guard = cache.lock("job").try_acquire()?;
//! assert!(guard.remaining() > std::time::Duration::ZERO);
//! let _ = guard.release()?;
//! # Ok::<(), cachelock::Error>(())
//! ```

use std::cell::Cell;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};
use tokio::time::Instant;

use crate::backend::SharedBackend;
use crate::error::{Error, Result};
use crate::key::CacheKey;
use crate::lock::{LockOptions, Outcome, Released};
use crate::memoize::{MemoizeError, MemoizeStream, OnLockFailure};

thread_local! {
    /// Set on the threads of cachelock's own runtime.
    static ON_OWN_RUNTIME: Cell<bool> = const { Cell::new(false) };
}

static RUNTIME: LazyLock<std::result::Result<Runtime, String>> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("cachelock-blocking")
        .on_thread_start(|| ON_OWN_RUNTIME.with(|f| f.set(true)))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
});

/// Why blocking here would deadlock, if it would.
fn refusal() -> Option<&'static str> {
    if ON_OWN_RUNTIME.with(Cell::get) {
        return Some(
            "called on cachelock's own runtime thread, which must stay free to drive the call",
        );
    }
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::CurrentThread => Some(
            "called inside a current-thread tokio runtime: blocking its only thread stops the \
             runtime, which may be the one driving the backend (a deadlock); use the async API",
        ),
        _ => None,
    }
}

/// Wakes a thread parked in [`block_on`].
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `fut` to completion on the calling thread, with cachelock's runtime
/// as the current runtime (its worker drives timers and I/O).
fn block_on<F: Future>(fut: F) -> Result<F::Output> {
    if let Some(why) = refusal() {
        return Err(Error::BlockingRefused(why.into()));
    }
    let rt = RUNTIME.as_ref().map_err(|e| {
        Error::BlockingRefused(format!("could not start cachelock's blocking runtime: {e}"))
    })?;
    let _enter = rt.enter();
    let mut fut = std::pin::pin!(fut);
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Ok(v);
        }
        std::thread::park();
    }
}

/// Connects to the backend a URL names (see [`connect`](crate::connect)),
/// with its connections on cachelock's runtime, and builds a handle with
/// the default settings.
///
/// ```no_run
/// let cache = cachelock::blocking::connect("redis://127.0.0.1:6379")?;
/// let n: u32 = cache.get_with("n", || 7)?;
/// # Ok::<(), cachelock::Error>(())
/// ```
///
/// # Errors
///
/// As [`Cache::connect`](crate::Cache::connect), and
/// [`Error::BlockingRefused`].
pub fn connect(url: &str) -> Result<Cache> {
    let cache = block_on(crate::Cache::connect(url))??;
    Ok(Cache::from_async(cache))
}

/// A blocking [`Cache`](crate::Cache): the same methods, blocking. Get one
/// from [`crate::Cache::blocking`] or [`connect`].
#[derive(Debug, Clone)]
pub struct Cache {
    inner: crate::Cache,
}

impl Cache {
    pub(crate) fn from_async(inner: crate::Cache) -> Self {
        Self { inner }
    }

    /// The async handle (shared: same settings, flights and background
    /// work).
    pub fn as_async(&self) -> &crate::Cache {
        &self.inner
    }

    /// As [`crate::Cache::lock`].
    pub fn lock(&self, key: impl Into<CacheKey>) -> CacheLock {
        CacheLock {
            inner: self.inner.lock(key),
        }
    }

    /// As [`crate::Cache::get_with`], blocking; `compute` runs on the
    /// calling thread.
    ///
    /// # Errors
    ///
    /// [`Error::BlockingRefused`] if and only if blocking here could
    /// deadlock (see the [module docs](self)).
    pub fn get_with<T, F>(&self, key: impl Into<CacheKey>, compute: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: FnOnce() -> T,
    {
        block_on(self.inner.get_with(key, || async { compute() }))
    }

    /// As [`crate::Cache::try_get_with`], blocking; `compute` runs on the
    /// calling thread.
    ///
    /// # Errors
    ///
    /// As the async form; [`MemoizeError::Config`] with
    /// [`Error::BlockingRefused`] if blocking here could deadlock.
    pub fn try_get_with<T, E, F>(
        &self,
        key: impl Into<CacheKey>,
        compute: F,
    ) -> std::result::Result<T, MemoizeError<E>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: FnOnce() -> std::result::Result<T, E>,
    {
        self.entry(key).or_try_insert_with(compute)
    }

    /// As [`crate::Cache::stream_with`], for an iterator of results: a
    /// blocking iterator. Dropping it early releases the lock and caches
    /// nothing.
    pub fn stream_with<T, E, I>(&self, key: impl Into<CacheKey>, items: I) -> MemoizeIter<T, E>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
        I: IntoIterator<Item = std::result::Result<T, E>>,
        I::IntoIter: Send + 'static,
    {
        self.entry(key).stream_with(items)
    }

    /// As [`crate::Cache::get`], blocking.
    ///
    /// # Errors
    ///
    /// [`Error::BlockingRefused`] if and only if blocking here could
    /// deadlock.
    pub fn get<T: DeserializeOwned>(&self, key: impl Into<CacheKey>) -> Result<Option<T>> {
        block_on(self.inner.get(key))
    }

    /// As [`crate::Cache::invalidate`], blocking.
    ///
    /// # Errors
    ///
    /// As the async form, and [`Error::BlockingRefused`].
    pub fn invalidate(&self, key: impl Into<CacheKey>) -> Result<()> {
        block_on(self.inner.invalidate(key))?
    }

    /// As [`crate::Cache::entry`].
    pub fn entry(&self, key: impl Into<CacheKey>) -> Entry<'_> {
        Entry {
            inner: self.inner.entry(key),
        }
    }

    /// As [`crate::Cache::close`], blocking.
    ///
    /// # Errors
    ///
    /// [`Error::BlockingRefused`] if and only if blocking here could
    /// deadlock.
    pub fn close(&self) -> Result<bool> {
        block_on(self.inner.close())
    }
}

/// A blocking [`Entry`](crate::Entry).
#[derive(Debug)]
pub struct Entry<'a> {
    inner: crate::Entry<'a>,
}

impl Entry<'_> {
    /// As [`crate::Entry::expiration`].
    #[must_use]
    pub fn expiration(self, expiration: Duration) -> Self {
        Self {
            inner: self.inner.expiration(expiration),
        }
    }

    /// As [`crate::Entry::on_lock_failure`].
    #[must_use]
    pub fn on_lock_failure(self, on: OnLockFailure) -> Self {
        Self {
            inner: self.inner.on_lock_failure(on),
        }
    }

    /// As [`crate::Entry::force_overwrite`].
    #[must_use]
    pub fn force_overwrite(self, force: bool) -> Self {
        Self {
            inner: self.inner.force_overwrite(force),
        }
    }

    /// As [`crate::Entry::lock_key`].
    #[must_use]
    pub fn lock_key(self, key: impl Into<String>) -> Self {
        Self {
            inner: self.inner.lock_key(key),
        }
    }

    /// As [`crate::Entry::or_try_insert_with`], blocking; `compute` runs on
    /// the calling thread.
    ///
    /// # Errors
    ///
    /// As the async form; [`MemoizeError::Config`] with
    /// [`Error::BlockingRefused`] if blocking here could deadlock.
    pub fn or_try_insert_with<T, E, F>(self, compute: F) -> std::result::Result<T, MemoizeError<E>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: FnOnce() -> std::result::Result<T, E>,
    {
        block_on(self.inner.or_try_insert_with(|| async { compute() }))
            .map_err(MemoizeError::Config)?
    }

    /// As [`crate::Entry::stream_with`], for an iterator: a blocking
    /// iterator.
    pub fn stream_with<T, E, I>(self, items: I) -> MemoizeIter<T, E>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
        I: IntoIterator<Item = std::result::Result<T, E>>,
        I::IntoIter: Send + 'static,
    {
        MemoizeIter {
            stream: Some(self.inner.stream_with(futures_util::stream::iter(items))),
        }
    }
}

/// A blocking [`CacheLock`](crate::CacheLock).
#[derive(Debug, Clone)]
pub struct CacheLock {
    inner: crate::CacheLock,
}

impl CacheLock {
    /// As [`crate::CacheLock::new`], for lock-only users.
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
    /// As the async form, and [`Error::BlockingRefused`].
    pub fn acquire(&self) -> Result<LockGuard> {
        guard(block_on(self.inner.acquire())?)
    }

    /// As [`crate::CacheLock::try_acquire`], blocking.
    ///
    /// # Errors
    ///
    /// As the async form, and [`Error::BlockingRefused`].
    pub fn try_acquire(&self) -> Result<LockGuard> {
        guard(block_on(self.inner.try_acquire())?)
    }

    /// As [`crate::CacheLock::acquire_timeout`], blocking.
    ///
    /// # Errors
    ///
    /// As the async form, and [`Error::BlockingRefused`].
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<LockGuard> {
        guard(block_on(self.inner.acquire_timeout(timeout))?)
    }

    /// As [`crate::CacheLock::with_lock`]: runs `work` while holding the
    /// lock (its lease kept alive), then releases it.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire); `work` did not run.
    pub fn with_lock<T>(&self, work: impl FnOnce() -> T) -> Result<Outcome<T>> {
        let guard = self.acquire()?;
        guard.keep_alive();
        let value = work();
        let released = match guard.release() {
            Ok(r) => Ok(r),
            Err(Error::Backend(e)) => Err(e),
            Err(e) => Err(crate::BackendError::protocol(self.key(), e)),
        };
        if let Err(e) = &released {
            tracing::error!(key = %self.key(), error = %e, "failed to release cache lock");
        }
        Ok(Outcome { value, released })
    }

    /// As [`crate::CacheLock::close`], blocking.
    ///
    /// # Errors
    ///
    /// [`Error::BlockingRefused`] if and only if blocking here could
    /// deadlock.
    pub fn close(&self) -> Result<bool> {
        block_on(self.inner.close())
    }
}

fn guard(acquired: Result<crate::LockGuard>) -> Result<LockGuard> {
    Ok(LockGuard {
        inner: Some(acquired?),
    })
}

/// A blocking [`LockGuard`](crate::LockGuard). Dropping it releases the
/// lock in the background on cachelock's runtime.
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped"]
#[clippy::has_significant_drop]
pub struct LockGuard {
    /// Always `Some` until consumed by `release` or `forget`.
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

    /// As [`crate::LockGuard::deadline`].
    pub fn deadline(&self) -> Instant {
        self.inner
            .as_ref()
            .map_or_else(Instant::now, |g| g.deadline())
    }

    /// As [`crate::LockGuard::remaining`].
    pub fn remaining(&self) -> Duration {
        self.inner
            .as_ref()
            .map_or(Duration::ZERO, |g| g.remaining())
    }

    /// Whether the lease is known to be gone.
    pub fn is_lost(&self) -> bool {
        self.inner.as_ref().is_none_or(|g| g.is_lost())
    }

    /// As [`crate::LockGuard::keep_alive`]: renews the lease in the
    /// background on cachelock's runtime until the guard is released,
    /// forgotten or dropped, the lease is lost, or the lock's `max_hold`.
    pub fn keep_alive(&self) {
        if let Some(g) = self.inner.as_ref() {
            let _enter = RUNTIME.as_ref().ok().map(|rt| rt.enter());
            g.keep_alive();
        }
    }

    /// As [`crate::LockGuard::extend`], blocking.
    ///
    /// # Errors
    ///
    /// As the async form, and [`Error::BlockingRefused`].
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
    /// [`Error::Backend`] if the backend failed; [`Error::BlockingRefused`]
    /// if blocking here could deadlock (the guard is then released in the
    /// background).
    pub fn release(mut self) -> Result<Released> {
        let Some(g) = self.inner.take() else {
            return Ok(Released::Released);
        };
        if let Some(why) = refusal() {
            self.inner = Some(g);
            return Err(Error::BlockingRefused(why.into()));
        }
        Ok(block_on(g.release())??)
    }

    /// As [`crate::LockGuard::forget`]: the key stays until its lease runs
    /// out.
    pub fn forget(mut self) {
        if let Some(g) = self.inner.take() {
            g.forget();
        }
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

/// The blocking iterator returned by [`Cache::stream_with`].
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
