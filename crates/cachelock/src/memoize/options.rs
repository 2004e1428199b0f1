//! Memoize settings: those of a [`Cache`](crate::Cache), validated once by
//! its builder, and those one call may override
//! ([`Entry`](crate::Entry)).

use std::time::Duration;

use rand::RngExt;

use super::codec::{self, Codec};
use super::fresh::Expiration;
use crate::error::Error;
use crate::key::{CacheKey, KeyBuilder};
use crate::lock::{LockOptions, check_duration};

/// The seed's default expiration: 30 days.
pub const DEFAULT_EXPIRATION: Duration = Duration::from_secs(60 * 60 * 24 * 30);

/// The seed's `CACHE_CHUNK_SIZE`: 1,047,552 bytes.
pub const DEFAULT_CHUNK_SIZE: usize = crate::backend::DEFAULT_MAX_VALUE_SIZE;

/// The smallest chunk size accepted.
pub(crate) const MIN_CHUNK_SIZE: usize = codec::CHUNK_OVERHEAD + codec::MIN_SEGMENT;

/// What memoize does when it could not take its lock (the wait timed out,
/// or the backend failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum OnLockFailure {
    /// Log an error and compute (and store) without the lock: the seed's
    /// choice. The lock is a stampede guard, not mutual exclusion.
    #[default]
    ComputeAnyway,
    /// Return [`MemoizeError::Lock`](super::MemoizeError::Lock) without
    /// computing.
    Fail,
    /// Return the old value if one is still stored (stale, or expired but
    /// within its backend TTL): never an error, never a second compute.
    /// With no old value, compute without the lock, as
    /// [`ComputeAnyway`](Self::ComputeAnyway).
    ServeStale,
}

/// A handle's memoize settings, validated once.
#[derive(Debug)]
pub(crate) struct Config {
    /// Builds full keys (with the encryption key as the secret, if any).
    pub(crate) keys: KeyBuilder,
    pub(crate) expiration: Expiration,
    /// The namespace generation counter ([`Cache::invalidate_all`](crate::Cache::invalidate_all)),
    /// if namespace invalidation is on.
    pub(crate) generation_key: Option<String>,
    /// Failure records: their TTL (the failure window), if shared.
    pub(crate) failure_ttl: Option<Duration>,
    /// Computes allowed per failure window beyond the first.
    pub(crate) failure_retries: u32,
    pub(crate) codec: Codec,
    /// The lock taken around a miss, if any.
    pub(crate) lock: Option<LockOptions>,
    /// Largest stored item: min(chunk size, backend limit).
    pub(crate) limit: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) poll_jitter: f64,
    pub(crate) single_flight: bool,
}

impl Config {
    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if the expiration or poll interval is zero
    /// or over [`MAX_DURATION`](crate::MAX_DURATION), the jitter is not a
    /// fraction, or the item limit is under [`MIN_CHUNK_SIZE`].
    pub(crate) fn validate(&self) -> crate::Result<()> {
        self.expiration.validate()?;
        check_duration("memoize poll interval", self.poll_interval, false)?;
        if let Some(t) = self.failure_ttl {
            check_duration("failure record TTL", t, false)?;
        }
        if !(0.0..=1.0).contains(&self.poll_jitter) {
            return Err(Error::InvalidConfig(format!(
                "the poll jitter must be a fraction between 0 and 1, not {}",
                self.poll_jitter
            )));
        }
        if self.limit < MIN_CHUNK_SIZE {
            return Err(Error::InvalidConfig(format!(
                "the chunk size (or the backend's item limit) must be at least \
                 {MIN_CHUNK_SIZE} bytes, not {}",
                self.limit
            )));
        }
        if let Some(lock) = &self.lock {
            lock.validate()?;
        }
        Ok(())
    }

    /// The pause before the next poll of a waiting caller.
    pub(crate) fn poll_pause(&self) -> Duration {
        let jitter = if self.poll_jitter > 0.0 {
            rand::rng().random_range(0.0..=self.poll_jitter)
        } else {
            0.0
        };
        self.poll_interval.saturating_add(
            Duration::try_from_secs_f64(self.poll_interval.as_secs_f64() * jitter)
                .unwrap_or_default(),
        )
    }

    /// The full key of the lock for `key` in a call.
    pub(crate) fn lock_key(&self, key: &CacheKey, call: &Call) -> String {
        match &call.lock_key {
            Some(k) => k.clone(),
            None => self.keys.lock_key(key),
        }
    }
}

/// What one call may override.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub(crate) expiration: Expiration,
    /// The compute can fail (`try_get_with`): failure records apply.
    pub(crate) fallible: bool,
    pub(crate) force_overwrite: bool,
    pub(crate) on_lock_failure: OnLockFailure,
    pub(crate) lock_key: Option<String>,
    /// False once the call overrode a setting that must be checked.
    pub(crate) checked: bool,
}

impl Call {
    /// A call with the handle's settings.
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            expiration: config.expiration,
            fallible: true,
            force_overwrite: false,
            on_lock_failure: OnLockFailure::ComputeAnyway,
            lock_key: None,
            checked: true,
        }
    }

    /// The backend TTL of the value.
    pub(crate) fn ttl(&self) -> Duration {
        self.expiration.hard_ttl()
    }

    /// Checks what the call overrode (the handle's own settings were
    /// checked by its builder).
    pub(crate) fn validate(&self) -> crate::Result<()> {
        if self.checked {
            return Ok(());
        }
        self.expiration.validate()?;
        if self.lock_key.as_deref() == Some("") {
            return Err(Error::InvalidConfig(
                "the lock key must not be empty".into(),
            ));
        }
        Ok(())
    }
}
