//! Locked memoization: compute an expensive value once, even when many
//! callers in many processes miss it at the same moment.
//!
//! [`memoize`] is the port of Djblets' `cache_memoize`, [`memoize_stream`]
//! (and [`memoize_iter`]) of `cache_memoize_iter`. The flow is the seed's:
//! read; on a hit return it (no lock). On a miss, with a lock configured,
//! take the lock, read again, compute only if the value is still missing,
//! store it and release the lock. Fixes to the original:
//!
//! * **Waiters are not serialised through the lock**: while waiting for the
//!   lock a caller also polls the value (every
//!   [`poll_interval`](MemoizeOptions::poll_interval), 5 ms plus jitter by
//!   default) and returns it as soon as it appears.
//! * **Single flight in one process** (on by default): concurrent callers
//!   for the same backend and full key share one attempt, the first read
//!   included; the others wait for it and decode its result without
//!   touching the cache, so a burst of 1,000 tasks makes one read. If the
//!   leading call is dropped, a waiter takes over; if its compute fails,
//!   each waiter goes on alone; if it could not take the lock and the
//!   options say fail, the waiters fail alike.
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
//! most [`chunk_size`](MemoizeOptions::chunk_size) bytes (and at most the
//! backend's [`max_value_size`](crate::Backend::max_value_size)), written
//! first with batched `set_many`, then a small manifest is written under the
//! key (format version, codec, total length, chunk count, a random write id,
//! an XXH3 checksum). Chunk keys contain the write id, so chunks of two
//! writes never mix, and chunks live a little longer than the manifest.
//! Every stored item carries a checksum; anything that fails a check is a
//! miss. Compression is LZ4 (lz4_flex); encryption is ChaCha20-Poly1305 with
//! a random nonce per item, and with an encryption key the cache keys are
//! HMACs, so key names leak nothing.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use cachelock::{LockOptions, MemoizeOptions, MemoryBackend, SharedBackend, Wait, memoize};
//!
//! let cache: SharedBackend = Arc::new(MemoryBackend::new());
//! let options = MemoizeOptions::new()
//!     .expiration(Duration::from_secs(3600))
//!     .lock(LockOptions::new().wait(Wait::Timeout(Duration::from_secs(10))));
//! let report: String = memoize(&cache, "report", &options, || async {
//!     Ok::<_, std::io::Error>("expensive".to_string())
//! })
//! .await
//! .unwrap();
//! assert_eq!(report, "expensive");
//! # }
//! ```

pub mod codec;
mod flight;
mod store;
mod stream;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::RngExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::backend::SharedBackend;
use crate::error::Error;
use crate::key::{CacheKey, KeyBuilder};
use crate::lock::{CacheLock, LockGuard, LockOptions, Wait};

pub use codec::{CHUNK_OVERHEAD, Compression, FORMAT_VERSION, INLINE_OVERHEAD};
pub use stream::{MemoizeStream, memoize_iter, memoize_stream};

use codec::{Cipher, Codec};
use flight::{Flight, FlightOutcome, Joined};
use store::{ReadOutcome, read_value, store_plain};

/// The seed's default expiration: 30 days.
pub const DEFAULT_EXPIRATION: Duration = Duration::from_secs(60 * 60 * 24 * 30);

/// The seed's `CACHE_CHUNK_SIZE`: 1,047,552 bytes.
pub const DEFAULT_CHUNK_SIZE: usize = crate::backend::DEFAULT_MAX_VALUE_SIZE;

/// What memoize does when it could not take its lock (the wait timed out,
/// a no-wait lock was held elsewhere, or the backend failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OnLockTimeout {
    /// Log an error and compute (and store) without the lock: the seed's
    /// choice. The lock is a stampede guard, not mutual exclusion.
    #[default]
    ComputeAnyway,
    /// Return [`MemoizeError::Lock`] without computing.
    Fail,
}

/// A memoize failure that matters to the caller. Cache read and write
/// failures are not among them: they are logged and the value is computed
/// (and returned) anyway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoizeError<E> {
    /// The compute function (or the stream's producer) failed. Its error,
    /// untouched. Nothing was cached.
    #[error("computing the value failed")]
    Compute(#[source] E),
    /// The lock could not be taken and the options say
    /// [`OnLockTimeout::Fail`]. Nothing was computed.
    #[error("could not take the memoize lock")]
    Lock(#[source] Error),
    /// The options were refused ([`Error::InvalidConfig`]).
    #[error("invalid memoize options")]
    Config(#[source] Error),
    /// A cached stream turned out corrupt or incomplete after some of its
    /// items had already been handed out (only from [`memoize_stream`]).
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

#[derive(Clone)]
struct Encryption {
    secret: Arc<[u8]>,
    cipher: Arc<Cipher>,
}

/// Settings of a [`memoize`] or [`memoize_stream`] call. The defaults are
/// the seed's (30 days, compression on, no lock, 1,047,552-byte chunks).
#[derive(Clone)]
pub struct MemoizeOptions {
    keys: KeyBuilder,
    /// `keys`, with the encryption key as its secret when one is set.
    effective_keys: KeyBuilder,
    expiration: Duration,
    force_overwrite: bool,
    compression: Compression,
    encryption: Option<Encryption>,
    lock: Option<LockOptions>,
    lock_key: Option<String>,
    on_lock_timeout: OnLockTimeout,
    chunk_size: usize,
    poll_interval: Duration,
    poll_jitter: f64,
    single_flight: bool,
}

impl fmt::Debug for MemoizeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoizeOptions")
            .field("keys", &self.keys)
            .field("expiration", &self.expiration)
            .field("force_overwrite", &self.force_overwrite)
            .field("compression", &self.compression)
            .field(
                "encryption",
                &self.encryption.as_ref().map(|_| "<redacted>"),
            )
            .field("lock", &self.lock)
            .field("lock_key", &self.lock_key)
            .field("on_lock_timeout", &self.on_lock_timeout)
            .field("chunk_size", &self.chunk_size)
            .field("poll_interval", &self.poll_interval)
            .field("poll_jitter", &self.poll_jitter)
            .field("single_flight", &self.single_flight)
            .finish()
    }
}

impl Default for MemoizeOptions {
    fn default() -> Self {
        Self {
            keys: KeyBuilder::default(),
            effective_keys: KeyBuilder::default(),
            expiration: DEFAULT_EXPIRATION,
            force_overwrite: false,
            compression: Compression::Lz4,
            encryption: None,
            lock: None,
            lock_key: None,
            on_lock_timeout: OnLockTimeout::ComputeAnyway,
            chunk_size: DEFAULT_CHUNK_SIZE,
            poll_interval: Duration::from_millis(5),
            poll_jitter: 0.5,
            single_flight: true,
        }
    }
}

impl MemoizeOptions {
    /// The default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// How full keys are built (namespace, escaping, length). Defaults to
    /// [`KeyBuilder::default()`] (no namespace).
    #[must_use]
    pub fn keys(mut self, keys: KeyBuilder) -> Self {
        self.keys = keys;
        self.refresh_keys();
        self
    }

    /// How long stored values live. Defaults to 30 days.
    #[must_use]
    pub fn expiration(mut self, expiration: Duration) -> Self {
        self.expiration = expiration;
        self
    }

    /// Compute and store even when the value is cached (the lock, if any,
    /// is still taken). Defaults to `false`.
    #[must_use]
    pub fn force_overwrite(mut self, force: bool) -> Self {
        self.force_overwrite = force;
        self
    }

    /// Compression of stored values: `true`/[`Compression::Lz4`] (the
    /// default) or `false`/[`Compression::None`]. Readers do not need the
    /// same setting: each stored item says how it was written.
    #[must_use]
    pub fn compression(mut self, compression: impl Into<Compression>) -> Self {
        self.compression = compression.into();
        self
    }

    /// Encrypts stored values with ChaCha20-Poly1305 under a key derived
    /// from `secret` (any length; use at least 16 random bytes). The cache
    /// keys become HMAC-SHA256s keyed with `secret` (unless the
    /// [`keys`](Self::keys) builder already has a secret of its own), so
    /// nothing about the key names leaks. A value written with another key,
    /// or without encryption, reads as a miss and is recomputed.
    #[must_use]
    pub fn encryption_key(mut self, secret: impl AsRef<[u8]>) -> Self {
        let secret: Arc<[u8]> = Arc::from(secret.as_ref());
        self.encryption = Some(Encryption {
            cipher: Arc::new(Cipher::new(&secret)),
            secret,
        });
        self.refresh_keys();
        self
    }

    /// Takes a [`CacheLock`] with these options around a miss. Off by
    /// default. The options' [`Wait`] bounds how long a caller waits; while
    /// waiting memoize polls the value and the lock every
    /// [`poll_interval`](Self::poll_interval) (the lock's own retry interval
    /// is not used).
    #[must_use]
    pub fn lock(mut self, lock: LockOptions) -> Self {
        self.lock = Some(lock);
        self
    }

    /// The full cache key of the lock, used as given. Defaults to
    /// [`KeyBuilder::lock_key`] of the value's key (`_lock_` put before it).
    #[must_use]
    pub fn lock_key(mut self, key: impl Into<String>) -> Self {
        self.lock_key = Some(key.into());
        self
    }

    /// What to do when the lock cannot be taken. Defaults to
    /// [`OnLockTimeout::ComputeAnyway`].
    #[must_use]
    pub fn on_lock_timeout(mut self, on: OnLockTimeout) -> Self {
        self.on_lock_timeout = on;
        self
    }

    /// The largest stored item, in bytes (also capped by the backend's
    /// `max_value_size`). Defaults to 1,047,552. At least 128.
    #[must_use]
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = bytes;
        self
    }

    /// How often a caller waiting for another's computation checks the value
    /// (the lock is tried every third check). Defaults to 5 ms, plus
    /// [`poll_jitter`](Self::poll_jitter): with single flight only one
    /// caller per process polls, so 16 waiting processes make about 4,000
    /// small reads a second, and a waiter is served at most ~8 ms after
    /// the value is stored.
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

    /// Whether concurrent [`memoize`] calls of this process for the same
    /// backend and key share one attempt. Defaults to `true`; turn it off
    /// to measure what the cache lock alone does (every call then reads,
    /// waits and polls on its own).
    #[must_use]
    pub fn single_flight(mut self, on: bool) -> Self {
        self.single_flight = on;
        self
    }

    /// The full cache key a value stored under `key` gets with these options.
    pub fn full_key(&self, key: &CacheKey) -> String {
        self.effective_keys.build_key(key)
    }

    /// The full cache key of the lock for `key` with these options.
    pub fn full_lock_key(&self, key: &CacheKey) -> String {
        match &self.lock_key {
            Some(k) => k.clone(),
            None => self.effective_keys.lock_key(key),
        }
    }

    /// The configured expiration.
    pub fn expiration_duration(&self) -> Duration {
        self.expiration
    }

    /// The configured lock options, if locking is on.
    pub fn lock_options(&self) -> Option<&LockOptions> {
        self.lock.as_ref()
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if the expiration or poll interval is zero,
    /// the jitter is not a fraction, the chunk size is under 128 bytes, or
    /// the lock options are invalid.
    pub fn validate(&self) -> crate::Result<()> {
        if self.expiration.is_zero() {
            return Err(Error::InvalidConfig(
                "the memoize expiration must be positive".into(),
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::InvalidConfig(
                "the memoize poll interval must be positive".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.poll_jitter) {
            return Err(Error::InvalidConfig(format!(
                "the poll jitter must be a fraction between 0 and 1, not {}",
                self.poll_jitter
            )));
        }
        if self.chunk_size < MIN_CHUNK_SIZE {
            return Err(Error::InvalidConfig(format!(
                "the chunk size must be at least {MIN_CHUNK_SIZE} bytes, not {}",
                self.chunk_size
            )));
        }
        if let Some(lock) = &self.lock {
            lock.validate()?;
        }
        if self.lock_key.as_deref() == Some("") {
            return Err(Error::InvalidConfig(
                "the lock key must not be empty".into(),
            ));
        }
        Ok(())
    }

    fn refresh_keys(&mut self) {
        self.effective_keys = match &self.encryption {
            Some(enc) if !self.keys.has_secret() => self.keys.clone().secret(enc.secret.to_vec()),
            _ => self.keys.clone(),
        };
    }

    fn poll_pause(&self) -> Duration {
        let jitter = if self.poll_jitter > 0.0 {
            rand::rng().random_range(0.0..=self.poll_jitter)
        } else {
            0.0
        };
        self.poll_interval + self.poll_interval.mul_f64(jitter)
    }
}

/// The smallest chunk size accepted.
const MIN_CHUNK_SIZE: usize = codec::CHUNK_OVERHEAD + codec::MIN_SEGMENT;

/// Everything one call needs, resolved once.
pub(crate) struct Ctx<'a> {
    pub(crate) cache: &'a SharedBackend,
    pub(crate) options: &'a MemoizeOptions,
    pub(crate) key: String,
    pub(crate) codec: Codec,
    /// Largest stored item: min(chunk_size, backend limit).
    pub(crate) limit: usize,
}

impl<'a> Ctx<'a> {
    fn new(
        cache: &'a SharedBackend,
        key: String,
        options: &'a MemoizeOptions,
    ) -> crate::Result<Self> {
        options.validate()?;
        let limit = options.chunk_size.min(cache.max_value_size());
        if limit < MIN_CHUNK_SIZE {
            return Err(Error::InvalidConfig(format!(
                "the backend's item limit ({limit} bytes) is too small for memoize"
            )));
        }
        Ok(Self {
            cache,
            options,
            key,
            codec: Codec {
                compression: options.compression,
                cipher: options.encryption.as_ref().map(|e| e.cipher.clone()),
            },
            limit,
        })
    }

    /// Plaintext bytes per chunk.
    pub(crate) fn segment(&self) -> usize {
        self.limit - codec::CHUNK_OVERHEAD
    }

    /// TTL of chunks: the expiration plus a tenth of it (1 s to 5 min), so a
    /// manifest never outlives its chunks.
    pub(crate) fn chunk_ttl(&self) -> Duration {
        let e = self.options.expiration;
        e + (e / 10).clamp(Duration::from_secs(1), Duration::from_secs(300))
    }
}

/// How waiting for the lock ended.
pub(crate) enum LockWait<V> {
    /// We hold the lock.
    Acquired(LockGuard),
    /// The value appeared while we waited.
    Value(V),
    /// We go on without the lock (already logged).
    Without,
    /// The lock could not be taken and the options say fail.
    Fail(Error),
}

/// Waits for the lock, polling `poll` (the value) between attempts unless
/// `force_overwrite`.
pub(crate) async fn wait_for_lock<V, P, PF>(
    ctx: &Ctx<'_>,
    lock_options: &LockOptions,
    lock_key: String,
    mut poll: P,
) -> LockWait<V>
where
    P: FnMut() -> PF,
    PF: Future<Output = Option<V>>,
{
    let options = ctx.options;
    let lock = match CacheLock::new(ctx.cache.clone(), lock_key, lock_options.clone()) {
        Ok(l) => l,
        Err(e) => return LockWait::Fail(e),
    };
    let wait = lock_options.default_wait();
    let start = Instant::now();
    loop {
        let err = match lock.try_acquire().await {
            Ok(guard) => return LockWait::Acquired(guard),
            Err(e) if e.is_held() => match wait {
                Wait::NoWait => Some(e),
                Wait::Timeout(t) if start.elapsed() >= t => Some(Error::TimedOut {
                    key: lock.key().to_owned(),
                    waited: start.elapsed(),
                }),
                _ => None,
            },
            Err(e) => Some(e),
        };
        if let Some(e) = err {
            if e.is_timed_out() {
                tracing::error!(key = %ctx.key, lock = %lock.key(), error = %e, "Timeout waiting on distributed cache lock");
            } else if e.is_held() {
                tracing::debug!(key = %ctx.key, lock = %lock.key(), "cache lock held elsewhere; not waiting");
            } else {
                tracing::error!(key = %ctx.key, lock = %lock.key(), error = %e, "could not take the distributed cache lock");
            }
            return match options.on_lock_timeout {
                OnLockTimeout::Fail => LockWait::Fail(e),
                OnLockTimeout::ComputeAnyway => LockWait::Without,
            };
        }
        // Poll the value often (it is what we wait for); try the lock only
        // every few polls (it frees up without a value only when the
        // holder failed or vanished), to halve the load of waiting.
        let polls = if options.force_overwrite {
            1
        } else {
            POLLS_PER_LOCK_TRY
        };
        for _ in 0..polls {
            let mut pause = options.poll_pause();
            if let Wait::Timeout(t) = wait {
                let left = t.saturating_sub(start.elapsed());
                if left.is_zero() {
                    break;
                }
                pause = pause.min(left);
            }
            tokio::time::sleep(pause).await;
            if !options.force_overwrite
                && let Some(v) = poll().await
            {
                return LockWait::Value(v);
            }
        }
    }
}

/// How many value polls a waiter makes between two lock attempts.
const POLLS_PER_LOCK_TRY: usize = 3;

/// Releases the lock, logging (not returning) a failure.
pub(crate) async fn release(guard: Option<LockGuard>, key: &str) {
    if let Some(guard) = guard
        && let Err(e) = guard.release().await
    {
        tracing::error!(%key, lock = %e.key(), error = %e, "failed to release the memoize lock");
    }
}

/// Returns the value cached under `key`, or computes it with `compute`,
/// stores it and returns it.
///
/// See the [module docs](self) for the flow. `T` is serialized with
/// postcard. Concurrent calls in one process for the same backend and full
/// key share one computation (single flight); the ones that waited decode
/// the leader's result, so `compute` of a waiting call may never run.
///
/// # Errors
///
/// * [`MemoizeError::Compute`] with `compute`'s error (nothing cached);
/// * [`MemoizeError::Lock`] if the lock could not be taken and the options
///   say [`OnLockTimeout::Fail`];
/// * [`MemoizeError::Config`] if the options are invalid.
///
/// Cache failures are logged, never returned.
///
/// # Cancel safety
///
/// Dropping the future releases a lock it holds (in the background) and
/// lets a waiting call of the same process take over.
pub async fn memoize<T, E, F, Fut>(
    cache: &SharedBackend,
    key: impl Into<CacheKey>,
    options: &MemoizeOptions,
    compute: F,
) -> Result<T, MemoizeError<E>>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    E: Send + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let key = key.into();
    let full_key = options.full_key(&key);
    let ctx = Ctx::new(cache, full_key, options).map_err(MemoizeError::Config)?;

    if options.force_overwrite {
        return lead(&ctx, &key, compute, None).await;
    }
    if !options.single_flight {
        if let ReadOutcome::Hit(v, _) = first_read::<T>(&ctx).await {
            return Ok(v);
        }
        return lead(&ctx, &key, compute, None).await;
    }
    // One attempt per process: the leader reads (and on a miss computes);
    // the others wait for it and decode what it found, so a burst of
    // callers makes one read, not one each.
    loop {
        match Flight::join(cache, &ctx.key) {
            Joined::Leader(flight) => {
                if let ReadOutcome::Hit(v, plain) = first_read::<T>(&ctx).await {
                    Flight::finish(Some(flight), FlightOutcome::Done(plain));
                    return Ok(v);
                }
                return lead(&ctx, &key, compute, Some(flight)).await;
            }
            Joined::Follower(waiter) => match waiter.wait().await {
                FlightOutcome::Done(plain) => match store::decode_value::<T>(&plain) {
                    Ok(v) => return Ok(v),
                    // Another type under the same key: go it alone.
                    Err(_) => return lead(&ctx, &key, compute, None).await,
                },
                // The leader was dropped: try again.
                FlightOutcome::Retry => {}
                FlightOutcome::ComputeFailed => {
                    if let ReadOutcome::Hit(v, _) = read_value::<T>(&ctx).await {
                        return Ok(v);
                    }
                    return lead(&ctx, &key, compute, None).await;
                }
                FlightOutcome::LockFailed(failure) => {
                    return Err(MemoizeError::Lock(failure.to_error()));
                }
            },
        }
    }
}

/// The first read of a call, logging a miss.
async fn first_read<T: DeserializeOwned>(ctx: &Ctx<'_>) -> ReadOutcome<T> {
    let found = read_value::<T>(ctx).await;
    if matches!(found, ReadOutcome::Miss) {
        tracing::debug!(key = %ctx.key, "Cache miss for key");
    }
    found
}

/// The leader's part: lock, double-check, compute, store, release.
async fn lead<T, E, F, Fut>(
    ctx: &Ctx<'_>,
    key: &CacheKey,
    compute: F,
    flight: Option<Flight>,
) -> Result<T, MemoizeError<E>>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let options = ctx.options;
    let mut guard = None;
    if let Some(lock_options) = &options.lock {
        let polled = wait_for_lock(ctx, lock_options, options.full_lock_key(key), || async {
            match read_value::<T>(ctx).await {
                ReadOutcome::Hit(v, plain) => Some((v, plain)),
                _ => None,
            }
        })
        .await;
        match polled {
            LockWait::Acquired(g) => {
                if !options.force_overwrite {
                    // Someone may have finished while we waited.
                    if let ReadOutcome::Hit(v, plain) = read_value::<T>(ctx).await {
                        release(Some(g), &ctx.key).await;
                        Flight::finish(flight, FlightOutcome::Done(plain));
                        return Ok(v);
                    }
                }
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
                return Err(if matches!(e, Error::InvalidConfig(_)) {
                    MemoizeError::Config(e)
                } else {
                    MemoizeError::Lock(e)
                });
            }
        }
    }

    let value = match compute().await {
        Ok(v) => v,
        Err(e) => {
            release(guard, &ctx.key).await;
            Flight::finish(flight, FlightOutcome::ComputeFailed);
            return Err(MemoizeError::Compute(e));
        }
    };
    match postcard::to_allocvec(&value) {
        Ok(plain) => {
            // The waiters of this process need not wait for the store.
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
