//! The settings of a [`RedisBackend`](super::RedisBackend).

use std::fmt;
use std::time::Duration;

use crate::error::{BackendError, BackendResult};

/// Redis's own limit on one string value (`proto-max-bulk-len`): 512 MiB.
pub const REDIS_MAX_VALUE_SIZE: usize = 512 * 1024 * 1024;

/// Settings of a [`RedisBackend`](super::RedisBackend).
///
/// ```
/// use std::time::Duration;
/// use cachelock::backend::redis::RedisOptions;
///
/// let options = RedisOptions::new()
///     .connect_timeout(Duration::from_secs(1))
///     .response_timeout(Duration::from_secs(10));
/// assert_eq!(options.connect_timeout_duration(), Duration::from_secs(1));
/// ```
#[derive(Clone, PartialEq, Eq)]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisOptions {
    pub(super) connect_timeout: Duration,
    pub(super) response_timeout: Duration,
    pub(super) max_value_size: usize,
    pub(super) tls_root_certificate: Option<Vec<u8>>,
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("max_value_size", &self.max_value_size)
            .field(
                "tls_root_certificate",
                &self.tls_root_certificate.as_ref().map(|_| "<PEM>"),
            )
            .finish()
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
            max_value_size: REDIS_MAX_VALUE_SIZE,
            tls_root_certificate: None,
        }
    }
}

impl RedisOptions {
    /// The default settings: 2 s connect timeout, 5 s response timeout,
    /// 512 MiB values.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long one attempt to open a connection (TCP or Unix connect, TLS
    /// handshake, `AUTH`/`SELECT`) may take. Defaults to 2 s: far above any
    /// healthy round trip and TLS handshake within a region, and short enough
    /// that a server that is down (or a black-holed address) is reported
    /// quickly.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long to wait for the reply to one command (or pipeline). Defaults
    /// to 5 s. The timeout covers moving the value over the network, so it
    /// must leave room for the largest value: the `redis` crate's own default
    /// of 500 ms would fail a few-MB memoized value on a slow or busy link;
    /// 5 s carries about 60 MB at 100 Mbit/s.
    #[must_use]
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// The largest value one item may hold; larger writes fail with
    /// [`BackendError::ValueTooLarge`] before anything is sent. Defaults to,
    /// and is capped at, Redis's limit of 512 MiB ([`REDIS_MAX_VALUE_SIZE`]).
    /// Lower it if the server's `proto-max-bulk-len` is lower, or to have
    /// memoize split big values into smaller chunks.
    #[must_use]
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes.min(REDIS_MAX_VALUE_SIZE);
        self
    }

    /// For `rediss://` URLs: trust the certificate authority in this PEM
    /// file's contents **instead of** the system's root certificates (a
    /// private CA, as many managed and self-hosted Redis deployments use).
    /// By default the system's roots are used. Without TLS it has no effect.
    #[must_use]
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_certificate = Some(pem.into());
        self
    }

    pub(super) fn tls_certificates(&self) -> Option<::redis::TlsCertificates> {
        self.tls_root_certificate
            .as_ref()
            .map(|pem| ::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            })
    }

    /// The connect timeout.
    pub fn connect_timeout_duration(&self) -> Duration {
        self.connect_timeout
    }

    /// The response timeout.
    pub fn response_timeout_duration(&self) -> Duration {
        self.response_timeout
    }

    /// The largest value one item may hold.
    pub fn max_value_bytes(&self) -> usize {
        self.max_value_size
    }

    pub(super) fn validate(&self) -> BackendResult<()> {
        if self.connect_timeout.is_zero() || self.response_timeout.is_zero() {
            return Err(BackendError::invalid_config(
                "invalid Redis options: the connect and response timeouts must be positive",
            ));
        }
        if self.max_value_size == 0 {
            return Err(BackendError::invalid_config(
                "invalid Redis options: the maximum value size must be positive",
            ));
        }
        if let Some(pem) = &self.tls_root_certificate
            && !pem
                .windows(b"-----BEGIN CERTIFICATE-----".len())
                .any(|w| w == b"-----BEGIN CERTIFICATE-----")
        {
            return Err(BackendError::invalid_config(
                "invalid Redis options: the TLS root certificate holds no PEM certificate \
                 (-----BEGIN CERTIFICATE-----)",
            ));
        }
        Ok(())
    }
}
