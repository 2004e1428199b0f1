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
mod options;
mod store;
mod stream;
mod wait;

use std::future::Future;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::SharedBackend;
use crate::error::Error;
use crate::handle::Inner;
use crate::key::CacheKey;
use crate::lock::Tasks;

/// For the `memoize_decode` fuzz target only; not part of the API.
#[doc(hidden)]
pub use codec::fuzz_decode;
pub use codec::{CHUNK_OVERHEAD, Compression, FORMAT_VERSION, INLINE_OVERHEAD};
pub use options::{DEFAULT_CHUNK_SIZE, DEFAULT_EXPIRATION, OnLockFailure};
pub use stream::MemoizeStream;

pub(crate) use codec::{Cipher, Codec};
pub(crate) use flight::Flights;
pub(crate) use options::{Call, Config, MIN_CHUNK_SIZE};
pub(crate) use stream::stream_with;

use flight::{Flight, FlightOutcome, Joined};
use store::store_plain;
pub(crate) use store::{ReadOutcome, read_value, read_value_only};
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
        }
    }

    /// Plaintext bytes per chunk.
    pub(crate) fn segment(&self) -> usize {
        self.limit - codec::CHUNK_OVERHEAD
    }

    /// TTL of chunks: the expiration plus a tenth of it (1 s to 5 min), so a
    /// manifest never outlives its chunks.
    pub(crate) fn chunk_ttl(&self) -> std::time::Duration {
        let e = self.call.expiration;
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
}

impl<E, F> Failure<E, F> {
    pub(crate) fn into_memoize_error(self) -> MemoizeError<E> {
        match self {
            Failure::Compute(e) => MemoizeError::Compute(e),
            Failure::Lock(e, _) => MemoizeError::Lock(e),
        }
    }
}

/// Returns the value cached under `key`, or computes it with `compute`,
/// stores it and returns it. See the [module docs](self) for the flow.
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
    if !call.force_overwrite {
        // The hit path: one read, nothing shared.
        if let ReadOutcome::Hit(v, _) = first_read::<T>(&ctx).await {
            return Ok(v);
        }
    }
    // The miss path is boxed, so the hit path's future stays small.
    Box::pin(miss(inner, &ctx, key, call, compute)).await
}

/// After a miss (or for a forced overwrite): single flight, then lead.
async fn miss<T, E, F, Fut>(
    inner: &Inner,
    ctx: &Ctx<'_>,
    key: &CacheKey,
    call: &Call,
    compute: F,
) -> Result<T, Failure<E, F>>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    if call.force_overwrite {
        return lead(ctx, key, compute, None, true).await;
    }
    if !inner.config.single_flight {
        return lead(ctx, key, compute, None, true).await;
    }
    // One attempt per handle: the leader computes (under the lock); the
    // others wait for it and decode what it found.
    let mut retries = 0;
    loop {
        match inner.flights.join::<T>(&ctx.key) {
            Joined::Leader(flight) => return lead(ctx, key, compute, Some(flight), true).await,
            Joined::Follower(waiter) => match waiter.wait().await {
                FlightOutcome::Done(plain) => match store::decode_value::<T>(&plain) {
                    Ok(v) => return Ok(v),
                    Err(_) => return lead(ctx, key, compute, None, true).await,
                },
                // The leader was dropped: try again, a few times.
                FlightOutcome::Retry => {
                    retries += 1;
                    if retries > flight::MAX_RETRIES {
                        tracing::debug!(key = %ctx.key, "memoize leaders kept going away; going on alone");
                        return lead(ctx, key, compute, None, true).await;
                    }
                }
                FlightOutcome::ComputeFailed => {
                    if let ReadOutcome::Hit(v, _) = read_value::<T>(ctx).await {
                        return Ok(v);
                    }
                    return lead(ctx, key, compute, None, true).await;
                }
                // The leader waited for the lock in vain, as long as we
                // would have: do what our own call says.
                FlightOutcome::LockFailed(failure) => {
                    return match call.on_lock_failure {
                        OnLockFailure::Fail => Err(Failure::Lock(failure.to_error(), compute)),
                        OnLockFailure::ComputeAnyway => lead(ctx, key, compute, None, false).await,
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
) -> Result<T, Failure<E, F>>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut guard = None;
    if let Some(lock_options) = ctx.config.lock.as_ref().filter(|_| locked) {
        let lock_key = ctx.config.lock_key(key, ctx.call);
        let polled = wait_for_lock(ctx, lock_options, lock_key, || async {
            match read_value::<T>(ctx).await {
                ReadOutcome::Hit(v, plain) => Some((v, plain)),
                _ => None,
            }
        })
        .await;
        match polled {
            LockWait::Acquired(g) => {
                if !ctx.call.force_overwrite {
                    // Someone may have finished while we waited.
                    if let ReadOutcome::Hit(v, plain) = read_value::<T>(ctx).await {
                        release(Some(g), &ctx.key).await;
                        Flight::finish(flight, FlightOutcome::Done(plain));
                        return Ok(v);
                    }
                }
                // Renewed while the compute runs, so a compute longer than
                // the lease still runs once.
                g.keep_alive();
                guard = Some(g);
            }
            LockWait::Value((v, plain)) => {
                Flight::finish(flight, FlightOutcome::Done(plain));
                return Ok(v);
            }
            LockWait::Without => {}
            LockWait::Fail(e) => {
                if let Some(failure) = flight::LockFailure::from_error(&e) {
                    Flight::finish(flight, FlightOutcome::LockFailed(failure));
                }
                return Err(Failure::Lock(e, compute));
            }
        }
    }

    let value = match compute().await {
        Ok(v) => v,
        Err(e) => {
            release(guard, &ctx.key).await;
            Flight::finish(flight, FlightOutcome::ComputeFailed);
            return Err(Failure::Compute(e));
        }
    };
    match postcard::to_allocvec(&value) {
        Ok(plain) => {
            // The waiters of this handle need not wait for the store.
            let plain = Bytes::from(plain);
            Flight::finish(flight, FlightOutcome::Done(plain.clone()));
            store_plain(ctx, &plain, guard.as_mut()).await;
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
