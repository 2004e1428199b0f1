//! Locked memoization: compute an expensive value once, even when many
//! callers in many processes miss it at the same moment.
//!
//! The entry points are methods of the [`Cache`](crate::Cache) handle:
//! [`get_with`](crate::Cache::get_with) (infallible compute),
//! [`try_get_with`](crate::Cache::try_get_with) (fallible compute),
//! [`stream_with`](crate::Cache::stream_with) (a sequence of items, the
//! seed's `cache_memoize_iter`), and [`entry`](crate::Cache::entry) to
//! override settings for one call. The flow is the seed's `cache_memoize`:
//! read; on a hit return it (no lock). On a miss, with the lock on (the
//! default), take the lock, read again, compute only if the value is still
//! missing, store it and release the lock. Fixes to the original:
//!
//! * **Waiters are not serialised through the lock**: while waiting for the
//!   lock a caller also polls the value (every
//!   [`poll_interval`](crate::CacheBuilder::poll_interval), 5 ms plus
//!   jitter by default) and returns it as soon as it appears.
//! * **Single flight in one handle** (on by default): concurrent callers of
//!   one `Cache` for the same full key and value type that missed share one
//!   attempt; the others wait for it and decode its result without touching
//!   the cache again. If the leading call is dropped, a waiter takes over
//!   (at most 8 times, then it goes on alone); if its compute fails, each
//!   waiter goes on alone; if it could not take the lock, each waiter does
//!   what *its own* call says ([`OnLockFailure`]).
//! * **A miss takes the lock and reads again in one round trip** where the
//!   backend can ([`Backend::add_reading`](crate::Backend::add_reading):
//!   one script on Redis, the add and the `mg`s pipelined on Memcached):
//!   the value (and the failure record, when failures are shared) is read
//!   right after the lock's add. A hit stays one plain read.
//! * A corrupt, partial or undecodable entry is a logged miss that is
//!   rebuilt under the lock.
//! * A compute error reaches the caller as [`MemoizeError::Compute`] and
//!   nothing is cached. Cache read and write errors are logged with the key
//!   and the computed value is still returned; a failed release is logged.
//! * `force_overwrite` takes the lock too.
//!
//! # Stored format
//!
//! Values are serialized with postcard. Small ones are stored inline under
//! the key (a hit is one round trip). Larger ones are cut into chunks of at
//! most [`chunk_size`](crate::CacheBuilder::chunk_size) bytes (and at most
//! the backend's [`max_value_size`](crate::Backend::max_value_size)),
//! written first with batched `set_many`, then a small manifest is written
//! under the key (format version, codec, total length, chunk count, a
//! random write id, an XXH3 checksum). Chunk keys contain the write id, so
//! chunks of two writes never mix, and chunks live a little longer than the
//! manifest. Every stored item carries a checksum; anything that fails a
//! check is a miss. Compression is LZ4 (lz4_flex); encryption is
//! ChaCha20-Poly1305 with a random nonce per item, and with an encryption
//! key the cache keys are HMACs, so key names leak nothing.
//!
//! A hit reads one key, the value's own: invalidation is folded into what
//! is stored there. [`invalidate`](crate::Cache::invalidate) writes a
//! tombstone, [`invalidate_soft`](crate::Cache::invalidate_soft) wraps the
//! item in a stale mark, and a compute writes its value with a
//! compare-and-set ([`Backend::set_if`](crate::Backend::set_if)) over what
//! it read before computing, so one that an invalidation overtook stores
//! nothing. Only [`invalidate_all`](crate::Cache::invalidate_all) needs a
//! second key per read (the namespace generation), so it is opt-in
//! ([`namespace_invalidation`](crate::CacheBuilder::namespace_invalidation)).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> cachelock::Result<()> {
//! use std::time::Duration;
//! use cachelock::{Cache, LockOptions, MemoryBackend};
//!
//! let cache = Cache::builder(MemoryBackend::new())
//!     .expiration(Duration::from_secs(3600))
//!     .lock(LockOptions::new().max_wait(Duration::from_secs(10)))
//!     .build()?;
//! let report: String = cache.get_with("report", || async { "expensive".to_string() }).await;
//! assert_eq!(report, "expensive");
//! # Ok(()) }
//! ```

mod codec;
mod flight;
mod fresh;
mod options;
mod store;
mod stream;
mod wait;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::SharedBackend;
use crate::error::Error;
use crate::handle::Inner;
use crate::key::CacheKey;
use crate::lock::{CacheLock, LockGuard, Tasks};

/// For the `memoize_decode` fuzz target only; not part of the API.
#[doc(hidden)]
pub use codec::fuzz_decode;
pub use codec::{CHUNK_OVERHEAD, Compression, FORMAT_VERSION, INLINE_OVERHEAD};
pub use fresh::{ENVELOPE_OVERHEAD, Expiration, xfetch};
pub use options::{DEFAULT_CHUNK_SIZE, DEFAULT_EXPIRATION, OnLockFailure};
pub use stream::MemoizeStream;

pub(crate) use codec::{Cipher, Codec};
pub(crate) use flight::Flights;
pub(crate) use fresh::{Rng, side_key};
pub(crate) use options::{Call, Config, MIN_CHUNK_SIZE};
pub(crate) use stream::stream_with;

use flight::{Flight, FlightOutcome, Joined};
use fresh::{Envelope, FailureRecord, State, metric, now_ms};
use store::Found;
pub(crate) use store::{ReadOutcome, invalidate, mark_stale, read_value, read_value_only};
use wait::{LockWait, release, wait_for_lock};

/// A memoize failure that matters to the caller. Cache read and write
/// failures are not among them: they are logged and the value is computed
/// (and returned) anyway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoizeError<E> {
    /// The compute function (or the stream's producer) failed. Its error,
    /// untouched. Nothing was cached.
    #[error("computing the value failed: {0}")]
    Compute(#[source] E),
    /// The lock could not be taken and the call says
    /// [`OnLockFailure::Fail`]. Nothing was computed.
    #[error("could not take the memoize lock: {0}")]
    Lock(#[source] Error),
    /// The call's settings were refused ([`Error::InvalidConfig`]), or a
    /// blocking call was refused ([`Error::BlockingRefused`]). Nothing was
    /// done.
    #[error("memoize call refused: {0}")]
    Config(#[source] Error),
    /// The compute failed recently, in this or another process, and its
    /// failure record says so (or the retry budget of the failure window
    /// is spent): nothing was computed. See
    /// [`CacheBuilder::share_failures`](crate::CacheBuilder::share_failures).
    #[error("computing the value for key {key:?} failed recently: {message}")]
    Failed {
        /// The full cache key of the value.
        key: String,
        /// What the record says (the compute error's type).
        message: String,
    },
    /// A cached stream turned out corrupt or incomplete after some of its
    /// items had already been handed out (only from streams).
    #[error("cached stream for key {key:?} could not be read to the end: {reason}")]
    Corrupt {
        /// The full cache key of the value.
        key: String,
        /// What was wrong.
        reason: String,
    },
}

impl<E> MemoizeError<E> {
    /// True for [`MemoizeError::Compute`].
    pub fn is_compute(&self) -> bool {
        matches!(self, Self::Compute(_))
    }

    /// The compute function's error, if this is one.
    pub fn into_compute(self) -> Option<E> {
        match self {
            Self::Compute(e) => Some(e),
            _ => None,
        }
    }
}

/// Everything one call needs, resolved once.
pub(crate) struct Ctx<'a> {
    pub(crate) cache: &'a SharedBackend,
    pub(crate) config: &'a Config,
    pub(crate) call: &'a Call,
    pub(crate) tasks: &'a Tasks,
    pub(crate) key: String,
    pub(crate) codec: &'a Codec,
    /// Largest stored item: min(chunk_size, backend limit).
    pub(crate) limit: usize,
    pub(crate) rng: &'a Rng,
    /// What the last read that was not a hit found.
    seen: Mutex<Seen>,
}

/// What a read found under the value's key, as stored (`None`: absent),
/// and the namespace generation read with it (0 if off or unset): what a
/// compute that follows writes its value over, and under.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    pub(crate) raw: Option<Bytes>,
    pub(crate) generation: u64,
    /// The value read was already past its hard end (kept only by the
    /// backend's coarse TTL): its going away is expiry, not an
    /// invalidation, so the write-back may also go where it is gone.
    pub(crate) expired: bool,
}

impl Seen {
    /// What the write-back of a compute that follows this read must find.
    pub(crate) fn over(&self) -> store::Over<'_> {
        store::Over {
            bytes: self.raw.as_deref(),
            or_absent: self.expired,
        }
    }
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(inner: &'a Inner, call: &'a Call, key: String) -> Self {
        Self {
            cache: &inner.backend,
            config: &inner.config,
            call,
            tasks: &inner.tasks,
            key,
            codec: &inner.config.codec,
            limit: inner.config.limit,
            rng: &inner.rng,
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Records what a read found.
    pub(crate) fn see(&self, seen: Seen) {
        *self.seen.lock() = seen;
    }

    /// What the last read that was not a hit found (nothing read yet:
    /// absent, generation 0).
    pub(crate) fn seen(&self) -> Seen {
        self.seen.lock().clone()
    }

    /// The largest item stored under the value's key: the item limit less
    /// room for a stale mark.
    pub(crate) fn key_item_limit(&self) -> usize {
        self.limit.saturating_sub(codec::STALE_MARK_LEN)
    }

    /// Whether failure records apply to this call.
    pub(crate) fn shares_failures(&self) -> bool {
        self.call.fallible && self.config.failure_ttl.is_some()
    }

    /// The key of the value's failure record.
    pub(crate) fn failure_key(&self) -> String {
        side_key(&self.key, "f")
    }

    /// Plaintext bytes per chunk.
    pub(crate) fn segment(&self) -> usize {
        self.limit - codec::CHUNK_OVERHEAD
    }

    /// TTL of chunks: the expiration plus a tenth of it (1 s to 5 min), so a
    /// manifest never outlives its chunks.
    pub(crate) fn chunk_ttl(&self) -> std::time::Duration {
        let e = self.call.ttl();
        e.saturating_add((e / 10).clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(300),
        ))
    }
}

/// Why [`run`] returned no value.
pub(crate) enum Failure<E, F> {
    /// The compute failed.
    Compute(E),
    /// The lock could not be taken and the call says fail; the compute,
    /// which did not run, is handed back.
    Lock(Error, F),
    /// A failure record says the compute failed within the failure window;
    /// the compute, which did not run, is handed back.
    Shared(String, String, F),
}

impl<E, F> Failure<E, F> {
    pub(crate) fn into_memoize_error(self) -> MemoizeError<E> {
        match self {
            Failure::Compute(e) => MemoizeError::Compute(e),
            Failure::Lock(e, _) => MemoizeError::Lock(e),
            Failure::Shared(key, message, _) => MemoizeError::Failed { key, message },
        }
    }
}

/// A value found past its fresh time, kept for serving stale.
struct Old<T> {
    value: T,
    found: Found,
}

/// What a waiter's poll found.
enum Polled<T> {
    Value(T, Bytes),
    Failed(FailureRecord),
}

/// Returns the value cached under `key`, or computes it with `compute`,
/// stores it and returns it. See the [module docs](self) for the flow. A
/// stale (or early-refresh) hit refreshes in this call.
pub(crate) async fn run<T, E, F, Fut>(
    inner: &Inner,
    key: &CacheKey,
    call: &Call,
    compute: F,
) -> Result<T, Failure<E, F>>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let ctx = Ctx::new(inner, call, inner.config.keys.build_key(key));
    let old = match first(&ctx).await {
        First::Hit(v) => return Ok(v),
        First::Refresh(old) => {
            return Box::pin(refresh(inner, &ctx, key, compute, old)).await;
        }
        First::Miss(old) => old,
    };
    // The miss path is boxed, so the hit path's future stays small.
    Box::pin(miss(inner, &ctx, key, call, compute, old)).await
}

/// As [`run`], but a stale (or early-refresh) hit returns the old value at
/// once and the refresh runs in the background on the current tokio
/// runtime, counted in the handle's [`Tasks`] (so
/// [`Cache::close`](crate::Cache::close) waits for it). Outside a runtime
/// it refreshes in this call, as [`run`].
pub(crate) async fn run_background<T, E, F, Fut>(
    inner: &Arc<Inner>,
    key: &CacheKey,
    call: &Call,
    compute: F,
) -> Result<T, Failure<E, F>>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    E: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
{
    let ctx = Ctx::new(inner, call, inner.config.keys.build_key(key));
    let old = match first(&ctx).await {
        First::Hit(v) => return Ok(v),
        First::Refresh(old) => {
            let Ok(handle) = tokio::runtime::Handle::try_current() else {
                return Box::pin(refresh(inner, &ctx, key, compute, old)).await;
            };
            metric::inc(metric::REFRESH_STARTED);
            let Some(flight) = refresh_flight::<T>(inner, &ctx) else {
                metric::inc(metric::REFRESH_LOST);
                return Ok(old.value);
            };
            let task = BackgroundRefresh {
                inner: inner.clone(),
                key: key.clone(),
                call: call.clone(),
                full_key: ctx.key.clone(),
                seen: ctx.seen(),
                found: old.found,
            };
            inner
                .tasks
                .spawn(&handle, task.run::<T, E, F, Fut>(compute, flight));
            return Ok(old.value);
        }
        First::Miss(old) => old,
    };
    Box::pin(miss(inner, &ctx, key, call, compute, old)).await
}

/// What the first read of a call decided.
enum First<T> {
    /// A fresh value: return it.
    Hit(T),
    /// A value to serve while one caller refreshes it.
    Refresh(Old<T>),
    /// A miss (perhaps with an old value kept for stale-if-error and
    /// [`OnLockFailure::ServeStale`]).
    Miss(Option<Old<T>>),
}

/// The hit path: one read, nothing shared. Counts the hit or miss.
async fn first<T: DeserializeOwned>(ctx: &Ctx<'_>) -> First<T> {
    if ctx.call.force_overwrite {
        metric::inc(metric::MISS);
        return First::Miss(None);
    }
    let old = match first_read::<T>(ctx).await {
        ReadOutcome::Hit(v, _) => {
            metric::inc(metric::HIT);
            return First::Hit(v);
        }
        ReadOutcome::Stale(value, found) => match found.state {
            State::Early | State::Stale => {
                metric::inc(if found.state == State::Early {
                    metric::HIT
                } else {
                    metric::STALE_HIT
                });
                return First::Refresh(Old { value, found });
            }
            _ => Some(Old { value, found }),
        },
        _ => None,
    };
    metric::inc(metric::MISS);
    First::Miss(old)
}

/// The in-process part of a refresh: the flight to lead, or `None` if
/// another call of this handle is already refreshing the key (with single
/// flight off, a flight of nobody's).
fn refresh_flight<T: 'static>(inner: &Inner, ctx: &Ctx<'_>) -> Option<Option<Flight>> {
    if !inner.config.single_flight {
        return Some(None);
    }
    match inner.flights.join::<T>(&ctx.key) {
        Joined::Leader(f) => Some(Some(f)),
        Joined::Follower(_) => None,
    }
}

/// A refresh that runs on its own, after its caller got the old value.
struct BackgroundRefresh {
    inner: Arc<Inner>,
    key: CacheKey,
    call: Call,
    full_key: String,
    seen: Seen,
    found: Found,
}

impl BackgroundRefresh {
    async fn run<T, E, F, Fut>(self, compute: F, flight: Option<Flight>)
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let ctx = Ctx::new(&self.inner, &self.call, self.full_key);
        ctx.see(self.seen);
        let _: Option<T> = refresh_locked(&ctx, &self.key, compute, flight, self.found).await;
    }
}

/// A stale (or early-refresh) hit: one refresher per process (single
/// flight) and across processes (one non-blocking lock attempt) recomputes
/// in this call; every other caller returns the old value at once.
async fn refresh<T, E, F, Fut>(
    inner: &Inner,
    ctx: &Ctx<'_>,
    key: &CacheKey,
    compute: F,
    old: Old<T>,
) -> Result<T, Failure<E, F>>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    metric::inc(metric::REFRESH_STARTED);
    let Some(flight) = refresh_flight::<T>(inner, ctx) else {
        metric::inc(metric::REFRESH_LOST);
        return Ok(old.value);
    };
    match refresh_locked(ctx, key, compute, flight, old.found).await {
        Some(v) => Ok(v),
        None => Ok(old.value),
    }
}

/// The cross-process part of a refresh, for the leader of its flight: one
/// non-blocking lock attempt; the winner checks again (another process
/// may have refreshed), respects the retry budget, computes and stores
/// (keeping the lease alive meanwhile). Returns the new value, or `None`
/// when the old one is to be served.
async fn refresh_locked<T, E, F, Fut>(
    ctx: &Ctx<'_>,
    key: &CacheKey,
    compute: F,
    flight: Option<Flight>,
    found: Found,
) -> Option<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut guard = None;
    // The failure record, if it was read with the lock.
    let mut prior_read = None;
    if let Some(lock_options) = ctx.config.lock.as_ref() {
        let lock = CacheLock::from_parts(
            ctx.cache.clone(),
            ctx.config.lock_key(key, ctx.call),
            lock_options.clone(),
            ctx.tasks.clone(),
        );
        // A stale value is read again with the add: another process may
        // have refreshed it meanwhile.
        let with_lock = WithLock::new(ctx, found.state == State::Stale);
        let (attempt, read) = lock.try_acquire_reading(&with_lock.keys()).await;
        match attempt {
            Ok(g) => guard = Some(g),
            Err(e) => {
                if !e.is_held() {
                    tracing::warn!(key = %ctx.key, error = %e, "could not try the refresh lock; serving the stale value");
                }
                metric::inc(metric::REFRESH_LOST);
                return None;
            }
        }
        let (value, failure) = with_lock.decode::<T>(ctx, read).await;
        prior_read = failure;
        let now = match value {
            Some(value) => Some(value),
            None if found.state == State::Stale => Some(read_value::<T>(ctx).await),
            None => None,
        };
        if let Some(ReadOutcome::Hit(v, plain)) = now {
            release(guard, &ctx.key).await;
            Flight::finish(flight, FlightOutcome::Done(plain));
            metric::inc(metric::REFRESH_LOST);
            return Some(v);
        }
    }
    let prior = match prior_read {
        Some(prior) => prior,
        None => read_failure(ctx).await,
    };
    if prior
        .as_ref()
        .is_some_and(|r| r.attempts > ctx.config.failure_retries)
    {
        release(guard, &ctx.key).await;
        metric::inc(metric::FAILURE_SERVED);
        return None;
    }
    metric::inc(metric::REFRESH_WON);
    if let Some(g) = &guard {
        // Renewed while the compute runs, so a compute longer than the
        // lease is still one refresh.
        g.keep_alive();
    }
    let delta = Some(found.env.delta_ms);
    match compute_store(ctx, compute, guard, flight, delta, prior.is_some()).await {
        Ok(v) => Some(v),
        Err(_) => {
            tracing::warn!(key = %ctx.key, "refreshing a stale value failed; serving the stale value");
            None
        }
    }
}

/// After a miss (or for a forced overwrite): single flight, then lead.
async fn miss<T, E, F, Fut>(
    inner: &Inner,
    ctx: &Ctx<'_>,
    key: &CacheKey,
    call: &Call,
    compute: F,
    old: Option<Old<T>>,
) -> Result<T, Failure<E, F>>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    if call.force_overwrite || !inner.config.single_flight {
        return lead(ctx, key, compute, None, true, old).await;
    }
    // One attempt per handle: the leader computes (under the lock); the
    // others wait for it and decode what it found.
    let mut retries = 0;
    loop {
        match inner.flights.join::<T>(&ctx.key) {
            Joined::Leader(flight) => {
                return lead(ctx, key, compute, Some(flight), true, old).await;
            }
            Joined::Follower(waiter) => match waiter.wait().await {
                FlightOutcome::Done(plain) => match store::decode_value::<T>(&plain) {
                    Ok(v) => return Ok(v),
                    Err(_) => return lead(ctx, key, compute, None, true, old).await,
                },
                // The leader was dropped: try again, a few times.
                FlightOutcome::Retry => {
                    retries += 1;
                    if retries > flight::MAX_RETRIES {
                        tracing::debug!(key = %ctx.key, "memoize leaders kept going away; going on alone");
                        return lead(ctx, key, compute, None, true, old).await;
                    }
                }
                FlightOutcome::ComputeFailed => {
                    if let ReadOutcome::Hit(v, _) = read_value::<T>(ctx).await {
                        return Ok(v);
                    }
                    // The leader's failure is shared: no compute of our own.
                    if let Some(rec) = read_failure(ctx).await {
                        return shared(ctx, rec, old, compute);
                    }
                    return lead(ctx, key, compute, None, true, old).await;
                }
                // The leader waited for the lock in vain, as long as we
                // would have: do what our own call says.
                FlightOutcome::LockFailed(failure) => {
                    return match (call.on_lock_failure, old) {
                        (OnLockFailure::Fail, _) => Err(Failure::Lock(failure.to_error(), compute)),
                        (OnLockFailure::ServeStale, Some(o)) => Ok(o.value),
                        (_, old) => lead(ctx, key, compute, None, false, old).await,
                    };
                }
            },
        }
    }
}

/// The first read of a call, logging a miss.
async fn first_read<T: DeserializeOwned>(ctx: &Ctx<'_>) -> ReadOutcome<T> {
    let found = read_value_only::<T>(ctx).await;
    if matches!(found, ReadOutcome::Miss) {
        tracing::debug!(key = %ctx.key, "Cache miss for key");
    }
    found
}

/// The leader's part: lock (if `locked` and the handle has one),
/// double-check, compute, store, release.
async fn lead<T, E, F, Fut>(
    ctx: &Ctx<'_>,
    key: &CacheKey,
    compute: F,
    flight: Option<Flight>,
    locked: bool,
    old: Option<Old<T>>,
) -> Result<T, Failure<E, F>>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut guard = None;
    let sharing = ctx.shares_failures();
    // The failure record, if it was read with the lock.
    let mut prior_read = None;
    if let Some(lock_options) = ctx.config.lock.as_ref().filter(|_| locked) {
        let lock_key = ctx.config.lock_key(key, ctx.call);
        let wait_start = now_ms();
        let started = tokio::time::Instant::now();
        let with_lock = WithLock::new(ctx, !ctx.call.force_overwrite);
        let with_lock = &with_lock;
        let polled = wait_for_lock(
            ctx,
            lock_options,
            lock_key,
            &with_lock.keys(),
            |found| async {
                let (value, failure) = with_lock.decode::<T>(ctx, found).await;
                let value = match value {
                    Some(value) => value,
                    None => read_value::<T>(ctx).await,
                };
                match value {
                    ReadOutcome::Hit(v, plain) => Some(Polled::Value(v, plain)),
                    _ if sharing => match failure {
                        Some(failure) => failure,
                        None => read_failure(ctx).await,
                    }
                    .filter(|r| r.last_ms >= wait_start)
                    .map(Polled::Failed),
                    _ => None,
                }
            },
        )
        .await;
        if !matches!(polled, LockWait::Acquired(..)) {
            metric::inc(metric::WAITS);
            metrics::histogram!(metric::WAIT_SECONDS).record(started.elapsed().as_secs_f64());
        }
        match polled {
            LockWait::Acquired(g, found) => {
                // What was read with the add (after it), else read now.
                let (value, failure) = with_lock.decode::<T>(ctx, found).await;
                if !ctx.call.force_overwrite {
                    // Someone may have finished while we waited.
                    let now = match value {
                        Some(value) => value,
                        None => read_value::<T>(ctx).await,
                    };
                    if let ReadOutcome::Hit(v, plain) = now {
                        release(Some(g), &ctx.key).await;
                        Flight::finish(flight, FlightOutcome::Done(plain));
                        return Ok(v);
                    }
                }
                prior_read = failure;
                // Renewed while the compute runs, so a compute longer than
                // the lease still runs once.
                g.keep_alive();
                guard = Some(g);
            }
            LockWait::Value(Polled::Value(v, plain)) => {
                Flight::finish(flight, FlightOutcome::Done(plain));
                return Ok(v);
            }
            LockWait::Value(Polled::Failed(rec)) => {
                Flight::finish(flight, FlightOutcome::ComputeFailed);
                return shared(ctx, rec, old, compute);
            }
            LockWait::Without => {}
            LockWait::Fail(e) => {
                if ctx.call.on_lock_failure == OnLockFailure::ServeStale {
                    if let Some(o) = old {
                        return Ok(o.value);
                    }
                    // Nothing old to serve: compute without the lock.
                } else {
                    if let Some(failure) = flight::LockFailure::from_error(&e) {
                        Flight::finish(flight, FlightOutcome::LockFailed(failure));
                    }
                    return Err(Failure::Lock(e, compute));
                }
            }
        }
    }
    if ctx.call.force_overwrite {
        // No read came before: read what the write-back must find.
        store::read_seen(ctx).await;
    }
    // The retry budget: at most 1 + N computes per failure window.
    let prior = match prior_read {
        Some(prior) => prior,
        None => read_failure(ctx).await,
    };
    if let Some(rec) = prior
        .as_ref()
        .filter(|r| r.attempts > ctx.config.failure_retries)
    {
        release(guard, &ctx.key).await;
        Flight::finish(flight, FlightOutcome::ComputeFailed);
        return shared(ctx, rec.clone(), old, compute);
    }
    let delta = old.as_ref().map(|o| o.found.env.delta_ms);
    match compute_store(ctx, compute, guard, flight, delta, prior.is_some()).await {
        Ok(v) => Ok(v),
        Err(e) => match old {
            Some(o) if o.found.within_error_window() => {
                tracing::warn!(key = %ctx.key, "compute failed; serving the stale value (stale-if-error)");
                Ok(o.value)
            }
            _ => Err(Failure::Compute(e)),
        },
    }
}

/// Serves a shared failure: the old value within its stale-if-error
/// window, else the typed error.
fn shared<T, E, F>(
    ctx: &Ctx<'_>,
    rec: FailureRecord,
    old: Option<Old<T>>,
    compute: F,
) -> Result<T, Failure<E, F>> {
    metric::inc(metric::FAILURE_SERVED);
    match old {
        Some(o) if o.found.within_error_window() => Ok(o.value),
        _ => Err(Failure::Shared(ctx.key.clone(), rec.message, compute)),
    }
}

/// Computes, then stores the value with its envelope (fenced: only over
/// what was read before the compute), releases the lock and publishes to
/// the flight. A failed
/// compute writes a failure record (if the handle shares failures).
async fn compute_store<T, E, F, Fut>(
    ctx: &Ctx<'_>,
    compute: F,
    mut guard: Option<LockGuard>,
    flight: Option<Flight>,
    old_delta: Option<u32>,
    had_failure: bool,
) -> Result<T, E>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    // What the write-back must find unchanged, as read before the compute.
    let seen = ctx.seen();
    let started = tokio::time::Instant::now();
    let result = compute().await;
    let took = started.elapsed();
    metrics::histogram!(metric::COMPUTE_SECONDS).record(took.as_secs_f64());
    let value = match result {
        Ok(v) => v,
        Err(e) => {
            write_failure::<E>(ctx).await;
            release(guard, &ctx.key).await;
            Flight::finish(flight, FlightOutcome::ComputeFailed);
            return Err(e);
        }
    };
    match postcard::to_allocvec(&value) {
        Ok(plain) => {
            // The waiters of this handle need not wait for the store.
            let plain = Bytes::from(plain);
            Flight::finish(flight, FlightOutcome::Done(plain.clone()));
            // Fenced write-back: stored only over what was read before the
            // compute, so a value invalidated meanwhile is not stored.
            let env = Envelope::new(
                &ctx.call.expiration,
                now_ms(),
                Envelope::next_delta(old_delta, took),
                seen.generation,
            );
            let stored = store::store_value(ctx, &env, &plain, guard.as_mut(), seen.over()).await;
            if stored
                && had_failure
                && let Err(e) = ctx.cache.delete(&ctx.failure_key()).await
            {
                tracing::warn!(key = %ctx.key, error = %e, "could not delete the failure record");
            }
            release(guard, &ctx.key).await;
        }
        Err(e) => {
            tracing::error!(key = %ctx.key, error = %e, "Failed to serialize data for cache key");
            Flight::finish(flight, FlightOutcome::ComputeFailed);
            release(guard, &ctx.key).await;
        }
    }
    Ok(value)
}

/// What memoize reads with its first lock attempt: the value's keys
/// ([`store::read_keys`]) if `value` and, when the call shares failures,
/// the failure record.
struct WithLock<'c> {
    key: &'c str,
    value: Vec<&'c str>,
    failure: Option<String>,
}

impl<'c> WithLock<'c> {
    fn new(ctx: &'c Ctx<'_>, value: bool) -> Self {
        Self {
            key: &ctx.key,
            value: if value {
                store::read_keys(ctx).to_vec()
            } else {
                Vec::new()
            },
            failure: ctx.shares_failures().then(|| ctx.failure_key()),
        }
    }

    /// Splits `found` (see [`split`](Self::split)) into the value's
    /// outcome and the failure record, `None` for either part that was
    /// not read.
    async fn decode<T: DeserializeOwned>(
        &self,
        ctx: &Ctx<'_>,
        found: Option<Vec<Option<Bytes>>>,
    ) -> (Option<ReadOutcome<T>>, Option<Option<FailureRecord>>) {
        let Some((mut value, failure)) = found.and_then(|f| self.split(f)) else {
            return (None, None);
        };
        let value = if self.value.is_empty() {
            None
        } else {
            Some(store::decode_found::<T>(ctx, &mut value, true).await)
        };
        (
            value,
            self.failure
                .is_some()
                .then(|| decode_failure(failure.as_ref())),
        )
    }

    /// The keys, in the order [`split`](Self::split) expects them back.
    fn keys(&self) -> Vec<&str> {
        let mut keys = self.value.clone();
        keys.extend(self.failure.as_deref());
        keys
    }

    /// What was read, split into the value's part and the failure record;
    /// `None` if the backend returned the wrong number of values.
    fn split(&self, mut found: Vec<Option<Bytes>>) -> Option<(Vec<Option<Bytes>>, Option<Bytes>)> {
        if found.len() != self.value.len() + usize::from(self.failure.is_some()) {
            tracing::error!(key = %self.key, "backend returned the wrong number of values");
            return None;
        }
        let failure = if self.failure.is_some() {
            found.pop().flatten()
        } else {
            None
        };
        Some((found, failure))
    }
}

/// A failure record as stored (absent or unreadable: none).
fn decode_failure(raw: Option<&Bytes>) -> Option<FailureRecord> {
    raw.and_then(|raw| postcard::from_bytes(raw).ok())
}

/// The failure record of the value, if the call shares failures and one
/// is stored.
async fn read_failure(ctx: &Ctx<'_>) -> Option<FailureRecord> {
    if !ctx.shares_failures() {
        return None;
    }
    match ctx.cache.get(&ctx.failure_key()).await {
        Ok(raw) => decode_failure(raw.as_ref()),
        Err(e) => {
            tracing::warn!(key = %ctx.key, error = %e, "could not read the failure record");
            None
        }
    }
}

/// Writes (or counts up) the failure record after a failed compute.
async fn write_failure<E>(ctx: &Ctx<'_>) {
    let Some(ttl) = ctx.config.failure_ttl.filter(|_| ctx.shares_failures()) else {
        return;
    };
    let now = now_ms();
    let window = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let rec = match read_failure(ctx).await {
        Some(p) if now < p.first_ms.saturating_add(window) => FailureRecord {
            attempts: p.attempts.saturating_add(1),
            last_ms: now,
            ..p
        },
        _ => FailureRecord {
            message: format!("the compute failed with a {}", std::any::type_name::<E>()),
            attempts: 1,
            first_ms: now,
            last_ms: now,
        },
    };
    let left = rec
        .first_ms
        .saturating_add(window)
        .saturating_sub(now)
        .max(1);
    let Ok(bytes) = postcard::to_allocvec(&rec) else {
        return;
    };
    match ctx
        .cache
        .set(
            &ctx.failure_key(),
            &bytes,
            std::time::Duration::from_millis(left),
        )
        .await
    {
        Ok(()) => metric::inc(metric::FAILURE_WRITTEN),
        Err(e) => tracing::warn!(key = %ctx.key, error = %e, "could not write the failure record"),
    }
}
