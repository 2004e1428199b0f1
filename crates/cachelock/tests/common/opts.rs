//! Memoize settings for the cases written once over `SharedBackend`: a
//! recipe for a [`Cache`] handle on any backend, plus the settings one call
//! overrides through [`Cache::entry`]. The cases often read one value
//! through several backends (a [`Wrap`](super::memoize_cases::Wrap) stands
//! for another process), so a recipe builds one handle per backend and
//! keeps it: calls with the same recipe on the same backend share that
//! handle (and its single flight), as callers of one process do.

use std::sync::Arc;
use std::time::Duration;

use cachelock::{
    Cache, CacheBuilder, CacheKey, LockOptions, MemoizeError, MemoizeStream, MemoryBackend,
    OnLockFailure, SharedBackend,
};
use futures_util::Stream;
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;

type Step = Arc<dyn Fn(CacheBuilder) -> CacheBuilder + Send + Sync>;

/// A recipe for a handle, and per-call settings.
#[derive(Clone)]
pub struct Opts {
    steps: Vec<Step>,
    force_overwrite: bool,
    on_lock_failure: OnLockFailure,
    lock_key: Option<String>,
    handles: Arc<Mutex<Vec<(usize, Cache)>>>,
}

impl Opts {
    /// Keys used as given (no namespace), the lock off, the defaults
    /// otherwise (values live 30 days).
    pub fn new() -> Self {
        Self {
            steps: Vec::new(),
            force_overwrite: false,
            on_lock_failure: OnLockFailure::ComputeAnyway,
            lock_key: None,
            handles: Arc::default(),
        }
        .then(|b| b.namespace("").lock_on_miss(false))
    }

    /// One more builder step (a new recipe: handles are not shared with
    /// the old one).
    pub fn then(
        mut self,
        step: impl Fn(CacheBuilder) -> CacheBuilder + Send + Sync + 'static,
    ) -> Self {
        self.steps.push(Arc::new(step));
        self.handles = Arc::default();
        self
    }

    pub fn expiration(self, d: Duration) -> Self {
        self.then(move |b| b.expiration(d))
    }
    pub fn chunk_size(self, n: usize) -> Self {
        self.then(move |b| b.chunk_size(n))
    }
    pub fn compression(self, on: bool) -> Self {
        self.then(move |b| b.compression(on))
    }
    pub fn encryption_key(self, k: &[u8]) -> Self {
        let k = k.to_vec();
        self.then(move |b| b.encryption_key(&k))
    }
    pub fn namespace(self, ns: &str) -> Self {
        let ns = ns.to_owned();
        self.then(move |b| b.namespace(ns.clone()))
    }
    pub fn key_secret(self, s: &[u8]) -> Self {
        let s = s.to_vec();
        self.then(move |b| b.key_secret(s.clone()))
    }
    /// The lock around a miss, with these settings.
    pub fn lock(self, l: LockOptions) -> Self {
        self.then(move |b| b.lock(l.clone()).lock_on_miss(true))
    }
    pub fn poll_interval(self, d: Duration) -> Self {
        self.then(move |b| b.poll_interval(d))
    }
    pub fn poll_jitter(self, f: f64) -> Self {
        self.then(move |b| b.poll_jitter(f))
    }
    pub fn single_flight(self, on: bool) -> Self {
        self.then(move |b| b.single_flight(on))
    }

    /// Per call (the handles stay shared).
    pub fn force_overwrite(mut self, on: bool) -> Self {
        self.force_overwrite = on;
        self
    }
    pub fn on_lock_failure(mut self, on: OnLockFailure) -> Self {
        self.on_lock_failure = on;
        self
    }
    pub fn lock_key(mut self, k: impl Into<String>) -> Self {
        self.lock_key = Some(k.into());
        self
    }

    /// The builder of this recipe on `b`.
    pub fn builder(&self, b: &SharedBackend) -> CacheBuilder {
        self.steps
            .iter()
            .fold(Cache::builder(b.clone()), |acc, step| step(acc))
    }

    /// The handle of this recipe on `b` (built once per backend).
    pub fn on(&self, b: &SharedBackend) -> Cache {
        let id = Arc::as_ptr(b) as *const () as usize;
        let mut handles = self.handles.lock();
        if let Some((_, c)) = handles.iter().find(|(i, _)| *i == id) {
            return c.clone();
        }
        let c = self.builder(b).build().expect("valid test settings");
        handles.push((id, c.clone()));
        c
    }

    fn any(&self) -> Cache {
        self.builder(&(Arc::new(MemoryBackend::new()) as SharedBackend))
            .build()
            .expect("valid test settings")
    }

    /// The full key of `key` with these settings.
    pub fn full_key(&self, key: &CacheKey) -> String {
        self.any().full_key(key.clone())
    }

    /// The full key of the lock for `key` with these settings.
    pub fn full_lock_key(&self, key: &CacheKey) -> String {
        match &self.lock_key {
            Some(k) => k.clone(),
            None => self.any().full_lock_key(key.clone()),
        }
    }

    /// The entry for one call on `b`.
    pub fn entry<'a>(&self, cache: &'a Cache, key: impl Into<CacheKey>) -> cachelock::Entry<'a> {
        let mut e = cache
            .entry(key)
            .force_overwrite(self.force_overwrite)
            .on_lock_failure(self.on_lock_failure);
        if let Some(k) = &self.lock_key {
            e = e.lock_key(k.clone());
        }
        e
    }
}

/// One memoize call through the handle of `o` on `b`.
pub async fn memoize<T, E, F, Fut>(
    b: &SharedBackend,
    key: impl Into<CacheKey>,
    o: &Opts,
    compute: F,
) -> Result<T, MemoizeError<E>>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let cache = o.on(b);
    o.entry(&cache, key).or_try_insert_with(compute).await
}

/// One streaming memoize call through the handle of `o` on `b`.
pub fn memoize_stream<T, E, S>(
    b: &SharedBackend,
    key: impl Into<CacheKey>,
    o: &Opts,
    producer: S,
) -> MemoizeStream<T, E>
where
    T: Serialize + DeserializeOwned + Send + 'static,
    E: Send + 'static,
    S: Stream<Item = Result<T, E>> + Send + 'static,
{
    let cache = o.on(b);
    o.entry(&cache, key).stream_with(producer)
}

/// [`memoize_stream`] of an iterator.
pub fn memoize_iter<T, E, I>(
    b: &SharedBackend,
    key: impl Into<CacheKey>,
    o: &Opts,
    items: I,
) -> MemoizeStream<T, E>
where
    T: Serialize + DeserializeOwned + Send + 'static,
    E: Send + 'static,
    I: IntoIterator<Item = Result<T, E>>,
    I::IntoIter: Send + 'static,
{
    memoize_stream(b, key, o, futures_util::stream::iter(items))
}
