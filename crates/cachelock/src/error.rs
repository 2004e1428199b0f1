//! Error types.
//!
//! Two layers, kept apart on purpose (the shape follows redis-rs's `ErrorKind`
//! predicates and bb8's `RunError`):
//!
//! * [`BackendError`]: what a cache server (or the embedded cache) said or
//!   failed to say. Every variant names the key it was about.
//! * [`Error`]: what the lock and memoize layers report. "Held by someone
//!   else", "timed out waiting", "backend unavailable" and "lease already
//!   expired" are different variants, with predicates, so callers can tell
//!   them apart without matching on text.

use std::time::Duration;

/// A failure reported by a [`Backend`](crate::Backend).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The server could not be reached, the connection broke, or it refused
    /// to serve. The operation may or may not have taken effect.
    #[error("cache backend unavailable{}: {reason}", key_note(.key))]
    Unavailable {
        /// The key the operation was about.
        key: String,
        /// What went wrong, in words.
        reason: String,
    },
    /// The server did not answer within the configured response timeout.
    /// The operation may or may not have taken effect.
    #[error("cache backend timed out after {after:?}{}", key_note(.key))]
    TimedOut {
        /// The key the operation was about.
        key: String,
        /// How long the client waited.
        after: Duration,
    },
    /// The value is larger than the backend stores in one item.
    #[error("value for key {key:?} is too large: {size} bytes, the backend's limit is {limit}")]
    ValueTooLarge {
        /// The key the operation was about.
        key: String,
        /// The size of the value that was refused.
        size: usize,
        /// The backend's item limit in bytes.
        limit: usize,
    },
    /// The key cannot be used with this backend.
    #[error("invalid cache key {key:?}: {reason}")]
    InvalidKey {
        /// The key that was refused.
        key: String,
        /// Why it was refused.
        reason: String,
    },
    /// The server answered something the client did not expect, or refused
    /// the operation for a reason other than the ones above (for example
    /// `incr` on a value that is not a number).
    #[error("cache backend error{}: {message}", key_note(.key))]
    Protocol {
        /// The key the operation was about.
        key: String,
        /// The server's message or a description of the bad reply.
        message: String,
    },
    /// The backend could not be connected to or opened: a server that
    /// refuses the connection, does not answer, rejects the credentials or
    /// the database, or a cache file that cannot be opened. About no key, so
    /// it names the backend instead (password redacted). Retrying later may
    /// work, so [`is_unavailable`](Self::is_unavailable) is true.
    #[error("cannot connect to cache backend {backend}: {reason}")]
    Connect {
        /// The backend's URL (password redacted) or file path.
        /// [`key`](Self::key) returns it.
        backend: String,
        /// What went wrong, in words.
        reason: String,
    },
    /// A setting was refused before anything was tried (a zero timeout, an
    /// empty list of Cluster nodes, TLS settings the client cannot use).
    /// Retrying does not help: [`is_unavailable`](Self::is_unavailable) is
    /// false.
    #[error("invalid cache backend configuration: {reason}")]
    InvalidConfig {
        /// What is wrong, in words.
        reason: String,
    },
    /// The backend cannot do this at all (listing keys on Memcached).
    /// Retrying does not help: [`is_unavailable`](Self::is_unavailable) is
    /// false.
    #[error("{backend} cannot {operation}")]
    Unsupported {
        /// The backend, in words (`memcached`).
        backend: String,
        /// What it cannot do, in words (`list its keys`).
        operation: String,
    },
    /// A backend URL was refused before any connection was tried: unknown
    /// scheme, malformed address, or a scheme this build does not support.
    /// A password in the URL is replaced with `***`.
    #[error("invalid cache backend URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL, password redacted. [`key`](Self::key) returns it.
        url: String,
        /// Why it was refused.
        reason: String,
    },
}

/// ` (key "k")`, or nothing for errors not about one key (connecting).
fn key_note(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!(" (key {key:?})")
    }
}

impl BackendError {
    /// Builds an [`Unavailable`](Self::Unavailable) error.
    pub fn unavailable(key: impl Into<String>, reason: impl ToString) -> Self {
        Self::Unavailable {
            key: key.into(),
            reason: reason.to_string(),
        }
    }

    /// Builds a [`Protocol`](Self::Protocol) error.
    pub fn protocol(key: impl Into<String>, message: impl ToString) -> Self {
        Self::Protocol {
            key: key.into(),
            message: message.to_string(),
        }
    }

    /// Builds an [`InvalidConfig`](Self::InvalidConfig) error.
    pub fn invalid_config(reason: impl ToString) -> Self {
        Self::InvalidConfig {
            reason: reason.to_string(),
        }
    }

    /// Builds a [`Connect`](Self::Connect) error.
    pub fn connect(backend: impl Into<String>, reason: impl ToString) -> Self {
        Self::Connect {
            backend: backend.into(),
            reason: reason.to_string(),
        }
    }

    /// The key the failed operation was about; for [`Connect`](Self::Connect)
    /// and [`InvalidUrl`](Self::InvalidUrl) the backend's URL (password
    /// redacted); empty for [`InvalidConfig`](Self::InvalidConfig).
    pub fn key(&self) -> &str {
        match self {
            Self::Unavailable { key, .. }
            | Self::TimedOut { key, .. }
            | Self::ValueTooLarge { key, .. }
            | Self::InvalidKey { key, .. }
            | Self::Protocol { key, .. } => key,
            Self::InvalidUrl { url, .. } => url,
            Self::Connect { backend, .. } => backend,
            Self::InvalidConfig { .. } | Self::Unsupported { .. } => "",
        }
    }

    /// True if the server could not be reached or did not answer in time:
    /// the failure says nothing about the data, and retrying later may work.
    /// Never true for a refused URL or configuration
    /// ([`InvalidUrl`](Self::InvalidUrl), [`InvalidConfig`](Self::InvalidConfig)).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::TimedOut { .. } | Self::Connect { .. }
        )
    }

    /// True for a refused URL or configuration: fix the settings, retrying
    /// will not help.
    pub fn is_invalid_config(&self) -> bool {
        matches!(self, Self::InvalidConfig { .. } | Self::InvalidUrl { .. })
    }

    /// True if the server did not answer within the response timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::TimedOut { .. })
    }
}

/// A failure reported by [`CacheLock`](crate::CacheLock), its guard, or memoize.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A non-blocking acquire found the lock held by someone else.
    #[error("lock {key:?} is held by someone else")]
    Held {
        /// The full cache key of the lock.
        key: String,
    },
    /// This [`CacheLock`](crate::CacheLock) (or a clone of it) already
    /// holds the lock: acquiring it again would wait on ourselves until the
    /// lease ran out, so it fails at once. Nothing was sent.
    #[error("lock {key:?} is already held by this CacheLock; acquiring it again would deadlock")]
    AlreadyHeld {
        /// The full cache key of the lock.
        key: String,
    },
    /// A blocking acquire gave up after waiting for its timeout.
    #[error("timed out after {waited:?} waiting for lock {key:?}")]
    TimedOut {
        /// The full cache key of the lock.
        key: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The lock's lease ran out (by the local deadline), or the cache no
    /// longer holds our token: the lock may now belong to someone else.
    #[error("the lease on lock {key:?} has expired or was lost")]
    LeaseExpired {
        /// The full cache key of the lock.
        key: String,
    },
    /// The cache backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A setting was refused when a lock or memoize call was configured.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A [`blocking`](crate::blocking) call was refused because blocking
    /// this thread could deadlock (the message says why). Nothing was done.
    #[error("cachelock::blocking refused to block this thread: {0}")]
    BlockingRefused(String),
    /// A value could not be encoded for the cache.
    #[error("could not encode value for key {key:?}: {message}")]
    Encode {
        /// The key of the value.
        key: String,
        /// What went wrong.
        message: String,
    },
}

impl Error {
    /// True for [`Error::Held`].
    pub fn is_held(&self) -> bool {
        matches!(self, Self::Held { .. })
    }

    /// True for [`Error::AlreadyHeld`].
    pub fn is_already_held(&self) -> bool {
        matches!(self, Self::AlreadyHeld { .. })
    }

    /// True for [`Error::TimedOut`] (waiting for a lock, not a backend timeout).
    pub fn is_timed_out(&self) -> bool {
        matches!(self, Self::TimedOut { .. })
    }

    /// True for [`Error::BlockingRefused`].
    pub fn is_blocking_refused(&self) -> bool {
        matches!(self, Self::BlockingRefused(_))
    }

    /// True for [`Error::LeaseExpired`].
    pub fn is_lease_expired(&self) -> bool {
        matches!(self, Self::LeaseExpired { .. })
    }

    /// True if the backend could not be reached or did not answer in time.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Backend(e) if e.is_unavailable())
    }

    /// The backend error inside, if this is one.
    pub fn as_backend(&self) -> Option<&BackendError> {
        match self {
            Self::Backend(e) => Some(e),
            _ => None,
        }
    }
}

/// Result of a backend operation.
pub type BackendResult<T> = std::result::Result<T, BackendError>;

/// Result of a lock or memoize operation.
pub type Result<T> = std::result::Result<T, Error>;
