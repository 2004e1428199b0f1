//! The [`Cache`] handle: one thing to hold for locks and memoization.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::{Backend, SharedBackend};
use crate::error::{Error, Result};
use crate::key::{CacheKey, KeyBuilder};
use crate::lock::{CLOSE_TIMEOUT, CacheLock, LockOptions, Tasks};
use crate::memoize::{
    self, Call, Cipher, Codec, Compression, Config, DEFAULT_CHUNK_SIZE, DEFAULT_EXPIRATION,
    Expiration, Failure, Flights, MemoizeError, MemoizeStream, OnLockFailure, Rng,
};

/// The namespace keys are put under unless the builder says otherwise;
/// the `cachelock` command uses the same one, so `cachelock status report`
/// sees a lock taken with `cache.lock("report")`.
pub const DEFAULT_NAMESPACE: &str = "cachelock";

/// What [`Cache::builder`] accepts as a backend: any [`Backend`], an
/// `Arc` of one, or a [`SharedBackend`].
pub trait IntoBackend {
    /// The backend, shared.
    fn into_backend(self) -> SharedBackend;
}

impl<B: Backend> IntoBackend for B {
    fn into_backend(self) -> SharedBackend {
        Arc::new(self)
    }
}

impl<B: Backend> IntoBackend for Arc<B> {
    fn into_backend(self) -> SharedBackend {
        self
    }
}

impl IntoBackend for SharedBackend {
    fn into_backend(self) -> SharedBackend {
        self
    }
}

/// A handle on a cache: locks ([`lock`](Self::lock)) and stampede-safe
/// memoization ([`get_with`](Self::get_with),
/// [`try_get_with`](Self::try_get_with), [`stream_with`](Self::stream_with)),
/// with settings validated once by its [builder](Self::builder).
///
/// Cheap to clone (an `Arc` inside); clones share the backend, the settings,
/// the in-process single flight and the background work that
/// [`close`](Self::close) waits for. Hold one per backend, as you would a
/// connection pool.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> cachelock::Result<()> {
/// use std::time::Duration;
/// use cachelock::{Cache, MemoryBackend};
///
/// let cache = Cache::builder(MemoryBackend::new())
///     .expiration(Duration::from_secs(600))
///     .build()?;
/// let total: u64 = cache.get_with(("report", 2026), || async { 40 + 2 }).await;
/// assert_eq!(total, 42);
///
/// let guard = cache.lock("nightly").acquire().await?;
/// // ... work done by one process at a time ...
/// let _ = guard.release().await?;
/// cache.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Cache {
    pub(crate) inner: Arc<Inner>,
}

/// What clones of a [`Cache`] share.
pub(crate) struct Inner {
    pub(crate) backend: SharedBackend,
    pub(crate) namespace: String,
    pub(crate) config: Config,
    pub(crate) lock: LockOptions,
    pub(crate) flights: Flights,
    pub(crate) tasks: Tasks,
    /// Randomness that decides behaviour (XFetch).
    pub(crate) rng: Rng,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("Cache")
            .field("backend", &i.backend)
            .field("namespace", &i.namespace)
            .field("expiration", &i.config.expiration)
            .field("lock", &i.lock)
            .field("lock_on_miss", &i.config.lock.is_some())
            .field("encrypted", &i.config.codec.cipher.is_some())
            .finish_non_exhaustive()
    }
}

/// Test that the handle and its futures can move between threads.
#[allow(dead_code)]
fn bounds(cache: &Cache) {
    fn check_send_sync_static<T: Send + Sync + 'static>() {}
    fn check_send<T: Send>(_: &T) {}
    check_send_sync_static::<Cache>();
    check_send(&cache.get_with("k", || async { 1u8 }));
    check_send(&cache.try_get_with("k", || async { Ok::<u8, std::io::Error>(1) }));
    check_send(&cache.close());
}

impl Cache {
    /// A builder for a handle on `backend`: a [`Backend`], an `Arc` of one
    /// or a [`SharedBackend`].
    pub fn builder(backend: impl IntoBackend) -> CacheBuilder {
        CacheBuilder::new(backend.into_backend())
    }

    /// Connects to the backend a URL names (see [`connect`](crate::connect))
    /// and builds a handle with the default settings.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] if the URL is refused or the backend cannot be
    /// reached.
    pub async fn connect(url: &str) -> Result<Self> {
        let backend = crate::connect(url).await?;
        Self::builder(backend).build()
    }

    /// The backend.
    pub fn backend(&self) -> &SharedBackend {
        &self.inner.backend
    }

    /// The namespace keys are put under.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// How long memoized values are fresh (see
    /// [`expiration_policy`](Self::expiration_policy) for the rest).
    pub fn expiration(&self) -> Duration {
        self.inner.config.expiration.fresh_for()
    }

    /// The expiration policy of memoized values.
    pub fn expiration_policy(&self) -> Expiration {
        self.inner.config.expiration
    }

    /// The lock settings, of [`lock`](Self::lock) and of memoize's lock.
    pub fn lock_options(&self) -> &LockOptions {
        &self.inner.lock
    }

    /// The full cache key of `key` (namespace, escaping, hashing).
    pub fn full_key(&self, key: impl Into<CacheKey>) -> String {
        self.inner.config.keys.build_key(&key.into())
    }

    /// The full cache key of the lock memoize takes for `key`.
    pub fn full_lock_key(&self, key: impl Into<CacheKey>) -> String {
        self.inner.config.keys.lock_key(&key.into())
    }

    /// The lock on `key` (put under the namespace, as the `cachelock`
    /// command does), with the handle's lock settings.
    ///
    /// A lock's key is the key itself, so do not use one key both for a
    /// lock and for a memoized value; memoize's own lock lives under
    /// [`full_lock_key`](Self::full_lock_key).
    pub fn lock(&self, key: impl Into<CacheKey>) -> CacheLock {
        let inner = &self.inner;
        CacheLock::from_parts(
            inner.backend.clone(),
            inner.config.keys.build_key(&key.into()),
            inner.lock.clone(),
            inner.tasks.clone(),
        )
    }

    /// Returns the value cached under `key`, or computes it with `compute`,
    /// stores it and returns it (moka's `get_with`).
    ///
    /// # Concurrent calls on the same key
    ///
    /// Calls of this handle (and its clones) for the same key and value
    /// type that miss at the same time share one compute: one caller
    /// computes, the others receive its value, and their `compute` never
    /// runs. With the lock on (the default), callers in other processes
    /// wait for the lock while polling the value, so one compute serves
    /// them all too. If the lock cannot be taken (the lock's
    /// [`max_wait`](LockOptions::max_wait) passed), the value is computed
    /// anyway, as the seed did.
    ///
    /// Cache failures are logged and never returned: the value is computed.
    ///
    /// # Panics
    ///
    /// Never, unless `compute` panics.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future releases a lock it holds (in the background) and
    /// lets a waiting call of the same handle take over.
    pub async fn get_with<T, F, Fut>(&self, key: impl Into<CacheKey>, compute: F) -> T
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let key = key.into();
        let mut call = Call::new(&self.inner.config);
        call.fallible = false;
        let infallible = || async { Ok::<T, Infallible>(compute().await) };
        match memoize::run(&self.inner, &key, &call, infallible).await {
            Ok(v) => v,
            Err(Failure::Compute(never)) => match never {},
            // Not with ComputeAnyway; compute without the lock all the same.
            Err(Failure::Lock(_, compute) | Failure::Shared(_, _, compute)) => {
                match compute().await {
                    Ok(v) => v,
                    Err(never) => match never {},
                }
            }
        }
    }

    /// As [`get_with`](Self::get_with) for a compute that can fail (moka's
    /// `try_get_with`): its error is returned and nothing is cached.
    ///
    /// # Concurrent calls on the same key
    ///
    /// As for [`get_with`](Self::get_with). When the compute of the caller
    /// that went first fails, every waiting caller goes on alone (its own
    /// compute may run): errors are not shared.
    ///
    /// # Errors
    ///
    /// [`MemoizeError::Compute`] if and only if `compute` failed (nothing was
    /// cached).
    ///
    /// # Cancel safety
    ///
    /// As for [`get_with`](Self::get_with).
    pub async fn try_get_with<T, E, F, Fut>(
        &self,
        key: impl Into<CacheKey>,
        compute: F,
    ) -> std::result::Result<T, MemoizeError<E>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
    {
        self.entry(key).or_try_insert_with(compute).await
    }

    /// As [`try_get_with`](Self::try_get_with), but a stale value (within
    /// its [`stale_while_revalidate`](Expiration::stale_while_revalidate)
    /// window) or an [`early_refresh`](Expiration::early_refresh) hit is
    /// returned **at once** to every caller, the one that starts the
    /// refresh included: the refresh runs in the background, on the tokio
    /// runtime of the call. It is still one refresh per key in this handle
    /// (single flight) and one across processes (a non-blocking lock
    /// attempt); its lease is kept alive while it computes, and
    /// [`close`](Self::close) waits for it. Misses behave as in
    /// [`try_get_with`](Self::try_get_with): the caller computes (or waits)
    /// in the call. Outside a tokio runtime the refresh runs in the call.
    ///
    /// `compute` (and its future) must be `Send + 'static`, because it may
    /// outlive the call: that is why this is a method of its own rather
    /// than a setting. A failed background refresh is logged, shared as a
    /// failure record if the handle shares failures, and the stale value
    /// stays.
    ///
    /// # Errors
    ///
    /// As for [`try_get_with`](Self::try_get_with).
    ///
    /// # Cancel safety
    ///
    /// As for [`get_with`](Self::get_with); a refresh already started goes
    /// on in the background.
    pub async fn try_get_with_background<T, E, F, Fut>(
        &self,
        key: impl Into<CacheKey>,
        compute: F,
    ) -> std::result::Result<T, MemoizeError<E>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
    {
        self.entry(key).or_try_insert_with_background(compute).await
    }

    /// Memoizes the items of `producer` under `key` (the seed's
    /// `cache_memoize_iter`).
    ///
    /// Nothing runs until the stream is first polled. On a hit the cached
    /// items are streamed back and `producer` is dropped unpolled. On a miss
    /// (with the lock, as in [`get_with`](Self::get_with)) each item is
    /// passed on as soon as `producer` yields it and cached as it goes.
    ///
    /// * A producer error is passed on as [`MemoizeError::Compute`] and ends
    ///   the stream; nothing is cached and the lock is released.
    /// * Cache write failures are logged; the items keep coming, uncached.
    /// * A cached entry found unreadable before any item was handed out is
    ///   rebuilt under the lock. One found unreadable later (for example a
    ///   chunk evicted during a long read) ends the stream with
    ///   [`MemoizeError::Corrupt`].
    /// * There is no in-process single flight for streams; the lock makes
    ///   other callers wait and read the stored items.
    ///
    /// Dropping the stream before the end releases the lock (in the
    /// background) and leaves no manifest, so nothing partial is read back.
    pub fn stream_with<T, E, S>(&self, key: impl Into<CacheKey>, producer: S) -> MemoizeStream<T, E>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
        S: Stream<Item = std::result::Result<T, E>> + Send + 'static,
    {
        self.entry(key).stream_with(producer)
    }

    /// The value cached under `key`, if there is a readable one of type `T`.
    /// Never computes; an unreadable entry (corrupt, another type) or a
    /// failed read is `None` (and logged).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe (a read).
    pub async fn get<T>(&self, key: impl Into<CacheKey>) -> Option<T>
    where
        T: DeserializeOwned,
    {
        let call = Call::new(&self.inner.config);
        let ctx = memoize::Ctx::new(&self.inner, &call, self.full_key(key));
        match memoize::read_value_only::<T>(&ctx).await {
            memoize::ReadOutcome::Hit(v, _) => Some(v),
            memoize::ReadOutcome::Stale(v, found) if found.servable() => Some(v),
            _ => None,
        }
    }

    /// Invalidates the value cached under `key`, in every process: a
    /// tombstone replaces it (one write; its chunks, if any, expire on
    /// their own and are never read again), so the next read is a miss. A
    /// compute that started before never stores its value (fenced
    /// write-back: it writes only over what it read before computing).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] if and only if the backend failed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the value may or may not have been invalidated.
    pub async fn invalidate(&self, key: impl Into<CacheKey>) -> Result<()> {
        let full = self.full_key(key);
        memoize::invalidate(&self.inner.backend, &full).await?;
        Ok(())
    }

    /// Marks the value cached under `key` stale, in every process: it is
    /// served as stale (within its stale-while-revalidate window) while one
    /// caller refreshes it, or is a miss once past that window (a cached
    /// stream, which has no stale window, is a miss). The stored item is
    /// wrapped in a stale mark with a compare-and-set over what was read
    /// (a read, the TTL, a write: 3 round trips; a few tries if writers
    /// race it, then a tombstone as [`invalidate`](Self::invalidate)
    /// writes; an item with less than 5 s left gets the tombstone at once,
    /// because a mark would expire with it). Like a tombstone, the mark
    /// fences a compute that started before: it does not store its value.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] if and only if the backend failed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the value may or may not have been marked.
    pub async fn invalidate_soft(&self, key: impl Into<CacheKey>) -> Result<()> {
        let full = self.full_key(key);
        let fallback = self.inner.config.expiration.hard_ttl();
        memoize::mark_stale(&self.inner.backend, &full, fallback).await?;
        Ok(())
    }

    /// Invalidates every memoized value of the namespace, in every process,
    /// by bumping the namespace's generation counter (never `KEYS` or
    /// `FLUSH`). Each value's envelope records the generation it was
    /// computed under, and each read fetches the counter with the value (in
    /// the same round trip), so older values read as a miss; they expire on
    /// their own. Locks are not touched. Needs
    /// [`CacheBuilder::namespace_invalidation`] (off by default, because it
    /// adds that key to every read).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if namespace invalidation is off;
    /// [`Error::Backend`] if the backend failed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the generation may or may not have been bumped.
    pub async fn invalidate_all(&self) -> Result<()> {
        let Some(key) = self.inner.config.generation_key.as_deref() else {
            return Err(Error::InvalidConfig(
                "invalidate_all needs namespace invalidation: build the handle with \
                 CacheBuilder::namespace_invalidation(true) (in every process of the namespace)"
                    .to_owned(),
            ));
        };
        // Created at a random seed (so a counter that was evicted and
        // re-created does not bring old values back), else incremented.
        use rand::RngExt;
        let seed = u64::from(rand::rng().random::<u32>()) + 1;
        let b = &self.inner.backend;
        if !b
            .add(key, seed.to_string().as_bytes(), DEFAULT_EXPIRATION)
            .await?
        {
            b.incr(key, 1).await?;
        }
        Ok(())
    }

    /// A memoize call on `key` with settings of its own:
    /// `cache.entry(key).expiration(d).or_try_insert_with(f)`.
    pub fn entry(&self, key: impl Into<CacheKey>) -> Entry<'_> {
        Entry {
            cache: self,
            key: key.into(),
            call: Call::new(&self.inner.config),
        }
    }

    /// The same handle for synchronous code.
    pub fn blocking(&self) -> crate::blocking::Cache {
        crate::blocking::Cache::from_async(self.clone())
    }

    /// Waits (at most [`CLOSE_TIMEOUT`], 5 s) for the handle's background
    /// work: releases of guards dropped without release, the clean-up of
    /// acquires interrupted while their add was in flight, and background
    /// refreshes ([`try_get_with_background`](Self::try_get_with_background)).
    /// Call it before
    /// the process exits, so no lock is left behind for a whole lease.
    /// Returns whether all of it finished. The handle stays usable.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the work goes on in the background.
    pub async fn close(&self) -> bool {
        let done = self.inner.tasks.wait(CLOSE_TIMEOUT).await;
        if !done {
            tracing::warn!(
                running = self.inner.tasks.running(),
                "cachelock background work still running at close"
            );
        }
        done
    }
}

/// A memoize call with settings of its own, from [`Cache::entry`].
#[derive(Debug)]
pub struct Entry<'a> {
    cache: &'a Cache,
    key: CacheKey,
    call: Call,
}

impl Entry<'_> {
    /// How long the value is fresh (a [`Duration`]), or its whole
    /// [`Expiration`] policy. Defaults to the handle's
    /// [`expiration`](CacheBuilder::expiration).
    #[must_use]
    pub fn expiration(mut self, expiration: impl Into<Expiration>) -> Self {
        self.call.expiration = expiration.into();
        self.call.checked = false;
        self
    }

    /// What to do when the lock cannot be taken. Defaults to
    /// [`OnLockFailure::ComputeAnyway`].
    #[must_use]
    pub fn on_lock_failure(mut self, on: OnLockFailure) -> Self {
        self.call.on_lock_failure = on;
        self
    }

    /// Compute and store even when the value is cached (the lock, if on,
    /// is still taken; no single flight). Defaults to `false`.
    #[must_use]
    pub fn force_overwrite(mut self, force: bool) -> Self {
        self.call.force_overwrite = force;
        self
    }

    /// The full cache key of the lock, used as given. Defaults to
    /// [`Cache::full_lock_key`] of the key (`_lock_` put before it).
    #[must_use]
    pub fn lock_key(mut self, key: impl Into<String>) -> Self {
        self.call.lock_key = Some(key.into());
        self.call.checked = false;
        self
    }

    /// As [`Cache::try_get_with`], with this entry's settings.
    ///
    /// # Concurrent calls on the same key
    ///
    /// As for [`Cache::try_get_with`]. A caller that waited for another's
    /// attempt gets an outcome decided by its own settings: if the first
    /// caller could not take the lock, a waiter that says
    /// [`OnLockFailure::ComputeAnyway`] computes, one that says
    /// [`OnLockFailure::Fail`] fails.
    ///
    /// # Errors
    ///
    /// * [`MemoizeError::Compute`] with `compute`'s error (nothing cached);
    /// * [`MemoizeError::Lock`] if the lock could not be taken and the entry
    ///   says [`OnLockFailure::Fail`];
    /// * [`MemoizeError::Config`] if the entry's settings are out of range
    ///   (an expiration of zero or over [`MAX_DURATION`](crate::MAX_DURATION),
    ///   an empty lock key).
    ///
    /// # Cancel safety
    ///
    /// As for [`Cache::get_with`].
    pub async fn or_try_insert_with<T, E, F, Fut>(
        self,
        compute: F,
    ) -> std::result::Result<T, MemoizeError<E>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
    {
        self.call.validate().map_err(MemoizeError::Config)?;
        memoize::run(&self.cache.inner, &self.key, &self.call, compute)
            .await
            .map_err(Failure::into_memoize_error)
    }

    /// As [`Cache::try_get_with_background`], with this entry's settings: a
    /// stale or early-refresh hit is returned at once and refreshed in the
    /// background.
    ///
    /// # Errors
    ///
    /// As for [`or_try_insert_with`](Self::or_try_insert_with).
    ///
    /// # Cancel safety
    ///
    /// As for [`Cache::try_get_with_background`].
    pub async fn or_try_insert_with_background<T, E, F, Fut>(
        self,
        compute: F,
    ) -> std::result::Result<T, MemoizeError<E>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
    {
        self.call.validate().map_err(MemoizeError::Config)?;
        memoize::run_background(&self.cache.inner, &self.key, &self.call, compute)
            .await
            .map_err(Failure::into_memoize_error)
    }

    /// As [`Cache::stream_with`], with this entry's settings. Settings out
    /// of range end the stream at once with [`MemoizeError::Config`].
    pub fn stream_with<T, E, S>(self, producer: S) -> MemoizeStream<T, E>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
        S: Stream<Item = std::result::Result<T, E>> + Send + 'static,
    {
        if let Err(e) = self.call.validate() {
            return MemoizeStream::failed(MemoizeError::Config(e));
        }
        memoize::stream_with(self.cache, &self.key, self.call, producer)
    }
}

/// Builds a [`Cache`]; every setting is checked once, by
/// [`build`](Self::build).
#[derive(Clone)]
pub struct CacheBuilder {
    backend: SharedBackend,
    namespace: String,
    key_secret: Option<Vec<u8>>,
    expiration: Expiration,
    failure_ttl: Option<Duration>,
    failure_retries: u32,
    rng_seed: Option<u64>,
    lock: LockOptions,
    lock_on_miss: bool,
    compression: Compression,
    encryption_key: Option<Arc<[u8]>>,
    chunk_size: usize,
    poll_interval: Duration,
    poll_jitter: f64,
    single_flight: bool,
    namespace_invalidation: bool,
}

impl fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("backend", &self.backend)
            .field("namespace", &self.namespace)
            .field(
                "key_secret",
                &self.key_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("expiration", &self.expiration)
            .field("failure_ttl", &self.failure_ttl)
            .field("failure_retries", &self.failure_retries)
            .field("rng_seed", &self.rng_seed)
            .field("lock", &self.lock)
            .field("lock_on_miss", &self.lock_on_miss)
            .field("compression", &self.compression)
            .field(
                "encryption_key",
                &self.encryption_key.as_ref().map(|_| "<redacted>"),
            )
            .field("chunk_size", &self.chunk_size)
            .field("poll_interval", &self.poll_interval)
            .field("poll_jitter", &self.poll_jitter)
            .field("single_flight", &self.single_flight)
            .field("namespace_invalidation", &self.namespace_invalidation)
            .finish()
    }
}

impl CacheBuilder {
    fn new(backend: SharedBackend) -> Self {
        Self {
            backend,
            namespace: DEFAULT_NAMESPACE.to_owned(),
            key_secret: None,
            expiration: Expiration::fresh(DEFAULT_EXPIRATION),
            failure_ttl: None,
            failure_retries: 1,
            rng_seed: None,
            lock: LockOptions::default(),
            lock_on_miss: true,
            compression: Compression::Lz4,
            encryption_key: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            poll_interval: Duration::from_millis(5),
            poll_jitter: 0.5,
            single_flight: true,
            namespace_invalidation: false,
        }
    }

    /// The namespace keys are put under (`namespace:key`; `""`: none).
    /// Defaults to [`DEFAULT_NAMESPACE`] (`cachelock`), as the `cachelock`
    /// command's.
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Keys become the hex HMAC-SHA256 of the full key under `secret`, so
    /// key names leak nothing to whoever can list the cache. Defaults to
    /// none (or the [`encryption_key`](Self::encryption_key), if set).
    #[must_use]
    pub fn key_secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.key_secret = Some(secret.into());
        self
    }

    /// How long memoized values are fresh (a [`Duration`]: the single TTL,
    /// as before), or their whole [`Expiration`] policy
    /// (stale-while-revalidate, stale-if-error, early refresh). Defaults to
    /// 30 days fresh, nothing stale; fresh time plus the longer window at
    /// most [`MAX_DURATION`](crate::MAX_DURATION).
    #[must_use]
    pub fn expiration(mut self, expiration: impl Into<Expiration>) -> Self {
        self.expiration = expiration.into();
        self
    }

    /// Shares compute failures of [`Cache::try_get_with`] across processes:
    /// a failed compute writes a failure record (the error's type name)
    /// that lives `ttl` (the failure window). Callers waiting for that
    /// compute, in any process, get [`MemoizeError::Failed`] at their next
    /// poll instead of computing again (or the old value, with
    /// stale-if-error), and at most 1 + [`failure_retries`](Self::failure_retries)
    /// computes run per window. Defaults to off (each waiter goes on alone).
    #[must_use]
    pub fn share_failures(mut self, ttl: Duration) -> Self {
        self.failure_ttl = Some(ttl);
        self
    }

    /// With [`share_failures`](Self::share_failures), how many computes may
    /// run in one failure window after the first failed. Defaults to 1.
    #[must_use]
    pub fn failure_retries(mut self, n: u32) -> Self {
        self.failure_retries = n;
        self
    }

    /// Seeds the handle's random source for decisions (XFetch early
    /// refresh), for reproducible tests. Defaults to a seed from the OS.
    #[must_use]
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.rng_seed = Some(seed);
        self
    }

    /// The settings of [`Cache::lock`] and of the lock memoize takes around
    /// a miss. Defaults to [`LockOptions::default()`] (30 s lease, no wait
    /// limit).
    #[must_use]
    pub fn lock(mut self, lock: LockOptions) -> Self {
        self.lock = lock;
        self
    }

    /// Whether memoize takes the lock around a miss, so that callers in
    /// other processes wait for one compute. Defaults to `true`. While
    /// waiting memoize polls the value and the lock every
    /// [`poll_interval`](Self::poll_interval) (the lock's own retry interval
    /// is not used).
    #[must_use]
    pub fn lock_on_miss(mut self, on: bool) -> Self {
        self.lock_on_miss = on;
        self
    }

    /// Compression of stored values: `true`/[`Compression::Lz4`] or
    /// `false`/[`Compression::None`]. Defaults to LZ4. Readers do not need
    /// the same setting: each stored item says how it was written.
    #[must_use]
    pub fn compression(mut self, compression: impl Into<Compression>) -> Self {
        self.compression = compression.into();
        self
    }

    /// Encrypts stored values with ChaCha20-Poly1305 under a key derived
    /// from `secret` (any length; use at least 16 random bytes). The cache
    /// keys become HMAC-SHA256s keyed with `secret` (unless
    /// [`key_secret`](Self::key_secret) is set), so nothing about the key
    /// names leaks. A value written with another key, or without
    /// encryption, reads as a miss and is recomputed. Defaults to none.
    #[must_use]
    pub fn encryption_key(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.encryption_key = Some(Arc::from(secret.as_ref()));
        self
    }

    /// The largest stored item, in bytes (also capped by the backend's
    /// `max_value_size`). Defaults to 1,047,552. At least 128.
    #[must_use]
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = bytes;
        self
    }

    /// How often a caller waiting for another's computation checks the
    /// value (the lock is tried every third check). Defaults to 5 ms, plus
    /// [`poll_jitter`](Self::poll_jitter): with single flight only one
    /// caller per handle polls, so 16 waiting processes make about 4,000
    /// small reads a second, and a waiter is served at most ~8 ms after the
    /// value is stored.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Random extra pause added to each poll, as a fraction of the poll
    /// interval (0 to 1). Defaults to 0.5.
    #[must_use]
    pub fn poll_jitter(mut self, fraction: f64) -> Self {
        self.poll_jitter = fraction;
        self
    }

    /// Whether concurrent memoize calls of the handle for the same key
    /// share one attempt. Defaults to `true`; turn it off to measure what
    /// the cache lock alone does (every call then waits and polls on its
    /// own).
    #[must_use]
    pub fn single_flight(mut self, on: bool) -> Self {
        self.single_flight = on;
        self
    }

    /// Whether [`Cache::invalidate_all`] works: every read then fetches the
    /// namespace's generation counter with the value (the same round trip,
    /// one more key: on the embedded backend a read of two keys costs
    /// about 1.4 times a read of one)
    /// and values of an older generation are a miss. Defaults to off
    /// (`invalidate_all` is then refused). Turn it on in every process
    /// that shares the namespace: a handle with it off does not see the
    /// generation.
    #[must_use]
    pub fn namespace_invalidation(mut self, on: bool) -> Self {
        self.namespace_invalidation = on;
        self
    }

    /// Checks every setting once and builds the handle.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if and only if a setting is out of range:
    /// a duration of zero (lease, retry interval, expiration, poll
    /// interval) or over [`MAX_DURATION`](crate::MAX_DURATION), a jitter
    /// that is not a fraction between 0 and 1, or a chunk size (or backend
    /// item limit) under 128 bytes.
    pub fn build(self) -> Result<Cache> {
        let mut keys = KeyBuilder::new(self.namespace.clone());
        match (&self.key_secret, &self.encryption_key) {
            (Some(secret), _) => keys = keys.secret(secret.clone()),
            (None, Some(secret)) => keys = keys.secret(secret.to_vec()),
            (None, None) => {}
        }
        let limit = self.chunk_size.min(self.backend.max_value_size());
        let generation_key = self
            .namespace_invalidation
            .then(|| memoize::side_key(&keys.build_key(&CacheKey::from("")), "gen"));
        let config = Config {
            keys,
            expiration: self.expiration,
            generation_key,
            failure_ttl: self.failure_ttl,
            failure_retries: self.failure_retries,
            codec: Codec {
                compression: self.compression,
                cipher: self
                    .encryption_key
                    .as_deref()
                    .map(|k| Arc::new(Cipher::new(k))),
            },
            lock: self.lock_on_miss.then(|| self.lock.clone()),
            limit,
            poll_interval: self.poll_interval,
            poll_jitter: self.poll_jitter,
            single_flight: self.single_flight,
        };
        self.lock.validate()?;
        config.validate()?;
        if self.chunk_size < memoize::MIN_CHUNK_SIZE {
            return Err(Error::InvalidConfig(format!(
                "the chunk size must be at least {} bytes, not {}",
                memoize::MIN_CHUNK_SIZE,
                self.chunk_size
            )));
        }
        Ok(Cache {
            inner: Arc::new(Inner {
                backend: self.backend,
                namespace: self.namespace,
                config,
                lock: self.lock,
                flights: Flights::default(),
                tasks: Tasks::default(),
                rng: Rng::new(self.rng_seed),
            }),
        })
    }
}
