//! The Redis backend: one standalone server or a Redis Cluster.
//!
//! [`RedisBackend`] speaks to Redis through the `redis` crate's
//! async connections: a [`ConnectionManager`] (one multiplexed connection that
//! reconnects by itself) for a standalone server, and the `cluster_async`
//! [`ClusterConnection`] for a Cluster. Both sit behind one private enum that
//! implements the crate's `ConnectionLike`, so every operation is written once.
//!
//! # Commands
//!
//! | operation | command | round trips |
//! |---|---|---|
//! | `get` / `get_many` | `GET` / `MGET` | 1 |
//! | `set` / `set_many` | `SET key val PX ms` / one pipeline of them | 1 |
//! | `add` | `SET key val NX GET PX ms` (`SET key val NX PX ms` before Redis 7.0) | 1 |
//! | `touch` / `delete` / `ttl` | `PEXPIRE` / `DEL` / `PTTL` | 1 |
//! | `incr` | `INCRBY` | 1 |
//! | `delete_if_eq` | a Lua script (`EVALSHA`), or `DELEX key IFEQ` / `DELIFEQ` where the server has it | 1 |
//! | `extend_if_eq` | a Lua script (`EVALSHA`) | 1 |
//!
//! The scripts are sent by their SHA-1 (`EVALSHA`); on a `NOSCRIPT` reply
//! (a fresh or restarted server) the crate loads them and retries, so the
//! first call after a restart takes three round trips and all later ones one.
//! Both scripts are atomic on the server, so
//! [`atomic_token_ops`](Backend::atomic_token_ops) is `true`.
//!
//! Native compare-and-delete (`DELEX key IFEQ value`, Redis 8.4; `DELIFEQ`,
//! Valkey 9) is detected once at connect time with `COMMAND INFO`. Both reply
//! `0` for "absent" and for "another value" alike, so on a `0` the backend
//! sends one `EXISTS` to tell [`TokenCheck::Missing`] from
//! [`TokenCheck::Mismatch`]; a successful release stays one round trip.
//!
//! # TTLs
//!
//! TTLs are sent in milliseconds (`PX`, `PEXPIRE`). A zero TTL becomes 1 ms,
//! never "no expiry"; a sub-millisecond TTL is rounded up to 1 ms. TTLs over
//! 100 years are cut to 100 years (Redis refuses expiry times that overflow).
//!
//! # Cluster
//!
//! * `get_many` is one `MGET`: the `redis` crate splits a multi-slot `MGET`
//!   into one sub-command per hash slot, sends them concurrently and puts the
//!   replies back in the order of the keys (checked against a real 3-master
//!   Cluster by the tests).
//! * `set_many` groups the items by hash slot and sends one pipeline per slot,
//!   all concurrently (a Cluster pipeline must stay within one slot). Keys that
//!   share a hash tag (`{tag}`) share a slot and so go in one pipeline: callers
//!   that write many related keys (memoize's chunks) should give them one tag.
//! * The per-node reconnects, `MOVED`/`ASK` redirects and slot-map refreshes
//!   are the crate's; one operation, retries included, is bounded by the
//!   response timeout. The crate also re-sends a command after a broken
//!   connection or a timed-out reply, which cannot be turned off without
//!   turning off redirects: if the first attempt of `incr` or
//!   `delete_if_eq` took effect but its reply was lost, the retry answers as
//!   if it had not (`incr` counts twice, `delete_if_eq` → `Missing`). `add`
//!   is safe: `SET ... NX GET` returns the value already there, and our own
//!   token there means the first attempt stored it, so the retry answers
//!   `true`. The standalone backend never re-sends a command that may have
//!   reached the server.
//!
//! # Failures
//!
//! * connection refused, reset or broken, a failed handshake or
//!   authentication, a Cluster with no node for a slot, or a server that is
//!   loading / out of memory / read-only → [`BackendError::Unavailable`];
//! * a reply stream that breaks off mid-reply (it fails to parse; the crate
//!   replaces the connection) → [`BackendError::Unavailable`];
//! * no reply within the response timeout (or no connection within the
//!   connect timeout) → [`BackendError::TimedOut`];
//! * an error reply (`WRONGTYPE`, "not an integer", ...) or a reply of an
//!   unexpected shape → [`BackendError::Protocol`].
//!
//! # Runtime
//!
//! The connection's background tasks run on the tokio runtime that called
//! `connect`; use the backend on that runtime (it may be shared by any
//! number of tasks and threads of it).
//!
//! # Protocol
//!
//! A standalone connection speaks RESP3 unless the URL says
//! `?protocol=resp2` (or `resp3`): with RESP3 the connection manager hears of
//! a dropped connection at once, also while idle, and reconnects before the
//! next operation. A server without RESP3 (before Redis 6, some proxies) is
//! detected at connect time and spoken to in RESP2; then the first operation
//! after the server restarted while the backend was idle fails with
//! [`BackendError::Unavailable`] and the next one reconnects. Cluster
//! connections use the URL's protocol (RESP2 by default); the Cluster
//! connection reconnects to its nodes by itself.
//!
//! # Reconnects
//!
//! A standalone backend whose server went away fails each operation fast
//! (one connect attempt, bounded by the connect timeout) and reconnects on
//! the next operation once the server is back. An operation that failed
//! because the connection was *refused* was never sent, so it is retried once
//! on a fresh connection: the first operation after a restart succeeds.
//! A reply that times out gets the standalone connection replaced: a
//! connection that stopped answering (half-open after a host or network
//! failure) would otherwise time out every operation until the kernel gives
//! up on it, many minutes later.

use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::Slot;
use ::redis::io::tcp::TcpSettings;
use ::redis::{
    Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, Pipeline, ProtocolVersion, RedisError,
    RedisFuture, ServerErrorKind, Value,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::try_join_all;
use parking_lot::RwLock;
use tokio::time::Instant;

use self::url::{bad_tls, bad_url, parse_url, prepare, protocol_in_url, redact, short_redis_error};
use super::{Backend, TokenCheck, check_value_size};
use crate::error::{BackendError, BackendResult};

mod url;
pub use self::url::check_url;

/// Redis's own limit on one string value (`proto-max-bulk-len`): 512 MiB.
pub const REDIS_MAX_VALUE_SIZE: usize = 512 * 1024 * 1024;

/// The longest TTL sent to the server: 100 years, in milliseconds.
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// Settings of a [`RedisBackend`].
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
    connect_timeout: Duration,
    response_timeout: Duration,
    max_value_size: usize,
    tls_root_certificate: Option<Vec<u8>>,
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

    fn tls_certificates(&self) -> Option<::redis::TlsCertificates> {
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

    fn validate(&self) -> BackendResult<()> {
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

/// The connection, standalone or Cluster. Cloning is cheap (an `Arc` or a
/// channel sender); each operation works on its own clone.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How a backend reaches Redis.
enum Link {
    Single(Box<SingleLink>),
    Cluster(ClusterConnection),
}

/// A standalone connection that is replaced when a reply times out, or when
/// it failed as unavailable other than by an I/O error.
///
/// The `redis` crate's manager replaces a connection only when it reports an
/// I/O error. One that merely stops answering (a half-open TCP connection
/// after a host or network failure, a black-holed route) would time out
/// every operation until the kernel gives up on it, many minutes later. So
/// after a timed-out reply the connection is dropped, as redis-py does, and
/// the next operation connects afresh. Likewise after a reconnect whose
/// handshake failed without an I/O error (a reply cut in the middle, a
/// server still loading): the manager would return that error to every
/// later operation forever, without trying again.
struct SingleLink {
    client: ::redis::Client,
    config: ConnectionManagerConfig,
    /// The connection and its generation, bumped at each replacement.
    current: RwLock<(u64, ConnectionManager)>,
}

impl Link {
    /// The connection to use now, with its generation.
    fn snapshot(&self) -> (u64, Conn) {
        match self {
            Link::Single(single) => {
                let current = single.current.read();
                (current.0, Conn::Single(current.1.clone()))
            }
            Link::Cluster(cluster) => (0, Conn::Cluster(cluster.clone())),
        }
    }

    /// Drops the standalone connection of `generation` after a reply on it
    /// timed out or it failed for good (once, however many operations failed
    /// on it). The next operation connects again.
    fn discard(&self, generation: u64) {
        let Link::Single(single) = self else {
            return;
        };
        let mut current = single.current.write();
        if current.0 != generation {
            return;
        }
        match ConnectionManager::new_lazy_with_config(single.client.clone(), single.config.clone())
        {
            Ok(fresh) => {
                *current = (generation + 1, fresh);
                tracing::debug!("a Redis connection failed; it will be replaced");
            }
            Err(e) => tracing::warn!(error = %e, "could not prepare a new Redis connection"),
        }
    }
}

/// Which server-side compare-and-delete command the server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NativeDelete {
    /// Redis 8.4+: `DELEX key IFEQ value`.
    Delex,
    /// Valkey 9+: `DELIFEQ key value`.
    DelIfEq,
}

/// Deletes KEYS[1] if it holds ARGV[1]. 1: deleted; 0: another value; -1: absent.
static DELETE_IF_EQ: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v == false then return -1 end
if v ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
",
    )
});

/// Sets a TTL of ARGV[2] ms on KEYS[1] if it holds ARGV[1].
/// 1: extended; 0: another value; -1: absent.
static EXTEND_IF_EQ: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v == false then return -1 end
if v ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
",
    )
});

fn token_check(key: &str, code: i64) -> BackendResult<TokenCheck> {
    match code {
        1 => Ok(TokenCheck::Matched),
        0 => Ok(TokenCheck::Mismatch),
        -1 => Ok(TokenCheck::Missing),
        other => Err(BackendError::protocol(
            key,
            format!("unexpected reply {other} from an owner-checked operation"),
        )),
    }
}

/// A cache backend on Redis, standalone or Cluster.
///
/// Cheap to share as an `Arc<dyn Backend>`; all operations of one backend
/// share its connection(s), pipelined.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> cachelock::Result<()> {
/// use std::sync::Arc;
/// use cachelock::{CacheLock, LockOptions, RedisBackend};
///
/// let redis = Arc::new(RedisBackend::connect("redis://127.0.0.1:6379/0").await?);
/// let lock = CacheLock::new(redis, "example.com:report", LockOptions::default())?;
/// let guard = lock.try_acquire().await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisBackend {
    link: Link,
    options: RedisOptions,
    /// The URL(s) connected to, passwords masked.
    urls: Vec<String>,
    native_delete: Option<NativeDelete>,
    /// Cleared when the server refuses `SET ... NX GET` (before Redis 7.0):
    /// `add` then sends plain `SET ... NX`.
    set_nx_get: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("cluster", &self.is_cluster())
            .field("urls", &self.urls)
            .field("options", &self.options)
            .field("native_delete", &self.native_delete)
            .finish()
    }
}

impl RedisBackend {
    /// Connects to one standalone Redis server, with the default
    /// [`RedisOptions`].
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidUrl`] if the URL is malformed (see
    /// [`check_url`]); [`BackendError::Connect`] if the server cannot be
    /// reached, does not answer within the connect timeout, or refuses the
    /// credentials or the database.
    pub async fn connect(url: &str) -> BackendResult<Self> {
        Self::connect_with(url, RedisOptions::default()).await
    }

    /// Connects to one standalone Redis server with the given options.
    ///
    /// # Errors
    ///
    /// As for [`connect`](Self::connect), and [`BackendError::InvalidConfig`]
    /// for a zero timeout or TLS settings the client cannot use.
    pub async fn connect_with(url: &str, options: RedisOptions) -> BackendResult<Self> {
        options.validate()?;
        let info = prepare(parse_url(url)?);
        let started = Instant::now();
        let manager = if protocol_in_url(url) {
            open_manager(url, info, &options)
                .await
                .map_err(|e| finish_connect_error(url, e, started))?
        } else {
            // RESP3 lets the manager see a dropped connection at once, even
            // while idle, and reconnect before the next operation; without
            // it the first operation after a server restart fails. Servers
            // older than Redis 6 (and some proxies) lack `HELLO 3`: RESP2.
            let settings = info.redis_settings().clone();
            let resp3 = info
                .clone()
                .set_redis_settings(settings.clone().set_protocol(ProtocolVersion::RESP3));
            match open_manager(url, resp3, &options).await {
                Err(Ok(e)) if lacks_resp3(&e) => {
                    tracing::debug!(url = %redact(url), error = %e, "Redis has no RESP3; using RESP2");
                    let resp2 = info.set_redis_settings(settings.set_protocol(ProtocolVersion::RESP2));
                    open_manager(url, resp2, &options).await
                }
                other => other,
            }
            .map_err(|e| finish_connect_error(url, e, started))?
        };
        let mut backend = Self {
            link: Link::Single(Box::new(manager)),
            options,
            urls: vec![redact(url)],
            native_delete: None,
            set_nx_get: std::sync::atomic::AtomicBool::new(true),
        };
        backend.native_delete = backend
            .detect_native_delete()
            .await
            .map_err(|e| connect_failed(url, e))?;
        tracing::debug!(url = %redact(url), native_delete = ?backend.native_delete, "connected to Redis");
        Ok(backend)
    }

    /// Connects to a Redis Cluster through any of its nodes, with the
    /// default [`RedisOptions`]. The rest of the Cluster is discovered from
    /// them. All URLs must carry the same credentials; Redis Cluster has only
    /// database 0.
    ///
    /// # Errors
    ///
    /// As for [`connect`](Self::connect); also [`BackendError::InvalidConfig`]
    /// if `urls` is empty.
    pub async fn connect_cluster(urls: &[&str]) -> BackendResult<Self> {
        Self::connect_cluster_with(urls, RedisOptions::default()).await
    }

    /// Connects to a Redis Cluster with the given options.
    ///
    /// # Errors
    ///
    /// As for [`connect_cluster`](Self::connect_cluster).
    pub async fn connect_cluster_with(urls: &[&str], options: RedisOptions) -> BackendResult<Self> {
        options.validate()?;
        if urls.is_empty() {
            return Err(BackendError::invalid_config(
                "no Redis Cluster node URL was given",
            ));
        }
        let mut nodes = Vec::with_capacity(urls.len());
        for url in urls {
            nodes.push(prepare(parse_url(url)?));
        }
        let shown: Vec<String> = urls.iter().map(|u| redact(u)).collect();
        let tls = nodes
            .iter()
            .any(|n| matches!(n.addr(), ConnectionAddr::TcpTls { .. }));
        let mut builder = ::redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(options.connect_timeout)
            .response_timeout(options.response_timeout)
            .tcp_settings(TcpSettings::default().set_nodelay(true));
        if let Some(certs) = options.tls_certificates().filter(|_| tls) {
            builder = builder.certs(certs);
        }
        let client = builder
            .build()
            .map_err(|e| bad_url(&shown.join(","), short_redis_error(&e)))?;
        let started = Instant::now();
        let conn = tokio::time::timeout(
            options.connect_timeout + options.response_timeout,
            client.get_async_connection(),
        )
        .await
        .map_err(|_| {
            BackendError::connect(
                shown.join(","),
                format!("no answer within {:?}", started.elapsed()),
            )
        })?
        .map_err(|e| connect_error(&shown.join(","), e, started.elapsed()))?;
        let mut backend = Self {
            link: Link::Cluster(conn),
            options,
            urls: shown,
            native_delete: None,
            set_nx_get: std::sync::atomic::AtomicBool::new(true),
        };
        backend.native_delete = backend
            .detect_native_delete()
            .await
            .map_err(|e| connect_failed(&backend.urls.join(","), e))?;
        tracing::debug!(urls = ?backend.urls, native_delete = ?backend.native_delete, "connected to Redis Cluster");
        Ok(backend)
    }

    /// Whether this backend talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.link, Link::Cluster(_))
    }

    /// The backend's settings.
    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    /// Whether the server offers a native compare-and-delete (`DELEX ...
    /// IFEQ` or `DELIFEQ`), which [`delete_if_eq`](Backend::delete_if_eq)
    /// then uses instead of a script.
    pub fn has_native_compare_and_delete(&self) -> bool {
        self.native_delete.is_some()
    }

    /// Asks the server once whether it has `DELEX` or `DELIFEQ`. This is
    /// also the first command on the connection, so it proves the server
    /// serves us: an unavailable server (or one that wants a password) fails
    /// the connect. An error reply (an old server, `COMMAND` denied by ACL)
    /// means "no native command".
    async fn detect_native_delete(&self) -> BackendResult<Option<NativeDelete>> {
        let mut cmd = ::redis::cmd("COMMAND");
        cmd.arg("INFO").arg("DELEX").arg("DELIFEQ");
        match self.query::<Value>("", &cmd).await {
            Ok(reply) => Ok(native_delete_from_command_info(&reply)),
            Err(e) if e.is_unavailable() => Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "COMMAND INFO failed; using the compare-and-delete script");
                Ok(None)
            }
        }
    }

    /// Sends one command, mapping errors to [`BackendError`]s about `key`.
    async fn query<T: ::redis::FromRedisValue>(&self, key: &str, cmd: &Cmd) -> BackendResult<T> {
        let started = Instant::now();
        self.retrying(key, started, move |mut conn: Conn| async move {
            cmd.query_async::<T>(&mut conn).await
        })
        .await
    }

    /// Runs `op` (one request) under the overall deadline. A request that
    /// failed because the connection was refused was never sent, so it is
    /// retried once: the manager has started a fresh connect by then, and a
    /// server that has come back answers the retry.
    ///
    /// A timed-out reply gets its standalone connection replaced (see
    /// [`SingleLink`]).
    async fn retrying<T, F, Fut>(&self, key: &str, started: Instant, op: F) -> BackendResult<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        // The crate bounds each connect and each reply; this outer limit
        // only guards against a wait the crate does not bound.
        let limit = self.options.connect_timeout * 2 + self.options.response_timeout;
        let (mut generation, conn) = self.link.snapshot();
        let run = async {
            match op(conn).await {
                Err(e) if e.is_connection_refusal() && !self.is_cluster() => {
                    tracing::debug!(%key, error = %e, "Redis connection refused; retrying once on a new connection");
                    let (again, conn) = self.link.snapshot();
                    generation = again;
                    op(conn).await
                }
                other => other,
            }
        };
        let (outcome, replace) = match tokio::time::timeout(limit, run).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                let mapped = map_error(key, &e, started.elapsed());
                // The crate reconnects by itself after an I/O error, but a
                // reconnect that failed otherwise (its handshake reply cut
                // mid-way parses as garbage, a restarting server answers
                // LOADING) is kept and handed to every later operation at
                // once, with no new attempt, for good. Replace it.
                let stuck = mapped.is_unavailable() && !e.is_io_error();
                (mapped, stuck)
            }
            Err(_) => (
                BackendError::TimedOut {
                    key: key.to_owned(),
                    after: started.elapsed(),
                },
                true,
            ),
        };
        if replace || outcome.is_timeout() {
            self.link.discard(generation);
        }
        Err(outcome)
    }

    /// Sends one pipeline of `SET key value PX ms` for `items`.
    async fn set_pipeline(&self, items: &[(&str, &[u8])], ms: u64) -> BackendResult<()> {
        let Some((first, _)) = items.first() else {
            return Ok(());
        };
        let mut pipe = ::redis::pipe();
        for (k, v) in items {
            pipe.cmd("SET").arg(*k).arg(*v).arg("PX").arg(ms);
        }
        let pipe = &pipe;
        let replies: Vec<Value> = self
            .retrying(first, Instant::now(), move |mut conn: Conn| async move {
                pipe.query_async::<Vec<Value>>(&mut conn).await
            })
            .await?;
        if replies.len() != items.len() {
            return Err(BackendError::protocol(
                *first,
                format!(
                    "expected {} replies to a pipeline of SETs, got {}",
                    items.len(),
                    replies.len()
                ),
            ));
        }
        for ((k, _), reply) in items.iter().zip(&replies) {
            expect_ok(k, reply)?;
        }
        Ok(())
    }
}

/// Reads the reply to `COMMAND INFO DELEX DELIFEQ`: one entry per name,
/// nil for a command the server does not know.
fn native_delete_from_command_info(reply: &Value) -> Option<NativeDelete> {
    let entries = match reply {
        Value::Array(items) | Value::Set(items) => items,
        _ => return None,
    };
    let known = |i: usize| {
        entries.get(i).is_some_and(|v| {
            !matches!(v, Value::Nil) && !matches!(v, Value::Array(a) if a.is_empty())
        })
    };
    if known(0) {
        Some(NativeDelete::Delex)
    } else if known(1) {
        Some(NativeDelete::DelIfEq)
    } else {
        None
    }
}

fn expect_ok(key: &str, reply: &Value) -> BackendResult<()> {
    match reply {
        Value::Okay => Ok(()),
        Value::SimpleString(s) if s == "OK" => Ok(()),
        Value::ServerError(e) => Err(BackendError::protocol(key, format!("{e:?}"))),
        other => Err(BackendError::protocol(
            key,
            format!("unexpected reply to SET: {other:?}"),
        )),
    }
}

/// A TTL in whole milliseconds for `PX`/`PEXPIRE`: at least 1 (rounded up),
/// at most 100 years.
fn ttl_ms(ttl: Duration) -> u64 {
    let nanos = ttl.as_nanos();
    let ms = nanos.div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).clamp(1, MAX_TTL_MS)
}

/// Server error codes that mean "cannot serve now" rather than "bad request".
fn is_unavailable_code(code: &str) -> bool {
    matches!(
        code,
        "LOADING"
            | "MASTERDOWN"
            | "CLUSTERDOWN"
            | "TRYAGAIN"
            | "READONLY"
            | "OOM"
            | "BUSY"
            | "NOAUTH"
            | "WRONGPASS"
            | "MISCONF"
    )
}

/// Maps a `redis` crate error on an operation about `key` to a
/// [`BackendError`].
fn map_error(key: &str, e: &RedisError, elapsed: Duration) -> BackendError {
    if e.kind() == ErrorKind::InvalidClientConfig {
        return BackendError::invalid_config(format!("Redis: {}", short_redis_error(e)));
    }
    if e.is_timeout() {
        return BackendError::TimedOut {
            key: key.to_owned(),
            after: elapsed,
        };
    }
    let unavailable = match e.kind() {
        // A reply that does not parse is, in practice, a stream cut in the
        // middle of a reply; the crate replaces the connection.
        ErrorKind::Parse
        | ErrorKind::Io
        | ErrorKind::AuthenticationFailed
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        ) => true,
        _ => e.code().is_some_and(is_unavailable_code),
    };
    if unavailable {
        BackendError::unavailable(key, e)
    } else {
        BackendError::protocol(key, e)
    }
}

/// Whether a connect failed because the server does not speak RESP3.
fn lacks_resp3(e: &RedisError) -> bool {
    e.kind() == ErrorKind::RESP3NotSupported
        || e.code() == Some("NOPROTO")
        || (e.code() == Some("ERR") && e.detail().is_some_and(|d| d.contains("unknown command")))
}

/// Opens a connection manager: one connect attempt, bounded. The inner
/// `Err` is the crate's error (to look at), the outer one a finished
/// [`BackendError`].
async fn open_manager(
    url: &str,
    info: ConnectionInfo,
    options: &RedisOptions,
) -> Result<SingleLink, Result<RedisError, BackendError>> {
    let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
    let client = match options.tls_certificates() {
        Some(certs) if tls => {
            ::redis::Client::build_with_tls(info, certs).map_err(|e| Err(bad_tls(url, &e)))?
        }
        _ => ::redis::Client::open(info).map_err(|e| Err(bad_url(url, short_redis_error(&e))))?,
    };
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.connect_timeout))
        .set_response_timeout(Some(options.response_timeout))
        // One connect attempt per reconnect: a server that is down is
        // reported within the connect timeout instead of after a series of
        // backed-off attempts. The next operation tries again.
        .set_number_of_retries(0);
    let started = Instant::now();
    let manager = tokio::time::timeout(
        options.connect_timeout + options.response_timeout,
        ConnectionManager::new_with_config(client.clone(), config.clone()),
    )
    .await
    .map_err(|_| {
        Err(BackendError::connect(
            redact(url),
            format!("no answer within {:?}", started.elapsed()),
        ))
    })?
    .map_err(Ok)?;
    Ok(SingleLink {
        client,
        config,
        current: RwLock::new((0, manager)),
    })
}

fn finish_connect_error(
    url: &str,
    e: Result<RedisError, BackendError>,
    started: Instant,
) -> BackendError {
    match e {
        Ok(e) => connect_error(url, e, started.elapsed()),
        Err(e) => e,
    }
}

/// Says which server a failed first command was sent to.
fn connect_failed(url: &str, e: BackendError) -> BackendError {
    match e {
        BackendError::Unavailable { reason, .. } => BackendError::connect(redact(url), reason),
        BackendError::TimedOut { after, .. } => {
            BackendError::connect(redact(url), format!("no answer within {after:?}"))
        }
        other => other,
    }
}

fn connect_error(url: &str, e: RedisError, elapsed: Duration) -> BackendError {
    if e.kind() == ErrorKind::InvalidClientConfig {
        return BackendError::invalid_config(format!(
            "Redis at {}: {}",
            redact(url),
            short_redis_error(&e)
        ));
    }
    match map_error("", &e, elapsed) {
        BackendError::TimedOut { after, .. } => {
            BackendError::connect(redact(url), format!("no answer within {after:?}"))
        }
        // A server that answers the handshake with an error (wrong password,
        // no such database) cannot serve us either.
        _ => BackendError::connect(redact(url), e),
    }
}

#[async_trait]
impl Backend for RedisBackend {
    async fn get(&self, key: &str) -> BackendResult<Option<Bytes>> {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(key);
        let v: Option<Vec<u8>> = self.query(key, &cmd).await?;
        Ok(v.map(Bytes::from))
    }

    async fn get_many(&self, keys: &[&str]) -> BackendResult<Vec<Option<Bytes>>> {
        let Some(first) = keys.first() else {
            return Ok(Vec::new());
        };
        let mut cmd = ::redis::cmd("MGET");
        for k in keys {
            cmd.arg(*k);
        }
        let values: Vec<Option<Vec<u8>>> = self.query(first, &cmd).await?;
        if values.len() != keys.len() {
            return Err(BackendError::protocol(
                *first,
                format!(
                    "MGET of {} keys returned {} values",
                    keys.len(),
                    values.len()
                ),
            ));
        }
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<()> {
        check_value_size(key, value, self.max_value_size())?;
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(key).arg(value).arg("PX").arg(ttl_ms(ttl));
        let reply: Value = self.query(key, &cmd).await?;
        expect_ok(key, &reply)
    }

    async fn set_many(&self, items: &[(&str, &[u8])], ttl: Duration) -> BackendResult<()> {
        for (k, v) in items {
            check_value_size(k, v, self.max_value_size())?;
        }
        let ms = ttl_ms(ttl);
        if !self.is_cluster() {
            return self.set_pipeline(items, ms).await;
        }
        // A Cluster pipeline must stay within one hash slot: one per slot,
        // keeping the items' order within each.
        let mut slots: HashMap<Slot, usize> = HashMap::new();
        let mut groups: Vec<Vec<(&str, &[u8])>> = Vec::new();
        for &(k, v) in items {
            let next = groups.len();
            let i = *slots.entry(Slot::for_key(k)).or_insert(next);
            match groups.get_mut(i) {
                Some(group) => group.push((k, v)),
                None => groups.push(vec![(k, v)]),
            }
        }
        try_join_all(groups.iter().map(|group| self.set_pipeline(group, ms))).await?;
        Ok(())
    }

    /// `SET key value NX GET PX ms`: the reply is the value that was there
    /// (nil when the key was absent and is now ours). A value equal to ours
    /// means an earlier attempt of this very add (whose reply was lost and
    /// which was sent again, by the Cluster client or by a caller that
    /// retries) stored it: that is a success, not "held by someone else".
    /// Tokens are unique per acquire, so no other holder has the same value.
    /// On a server before Redis 7.0 (no `NX` with `GET`) it falls back to
    /// `SET key value NX PX ms`.
    async fn add(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<bool> {
        use std::sync::atomic::Ordering;
        check_value_size(key, value, self.max_value_size())?;
        if self.set_nx_get.load(Ordering::Relaxed) {
            let mut cmd = ::redis::cmd("SET");
            cmd.arg(key)
                .arg(value)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(ttl_ms(ttl));
            match self.query::<Option<Vec<u8>>>(key, &cmd).await {
                Ok(None) => return Ok(true),
                Ok(Some(old)) => return Ok(old == value),
                Err(BackendError::Protocol { message, .. })
                    if message.to_ascii_lowercase().contains("syntax") =>
                {
                    tracing::debug!(error = %message, "Redis has no SET NX GET; using SET NX");
                    self.set_nx_get.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(key).arg(value).arg("NX").arg("PX").arg(ttl_ms(ttl));
        match self.query::<Value>(key, &cmd).await? {
            Value::Nil => Ok(false),
            reply => expect_ok(key, &reply).map(|()| true),
        }
    }

    async fn touch(&self, key: &str, ttl: Duration) -> BackendResult<bool> {
        let mut cmd = ::redis::cmd("PEXPIRE");
        cmd.arg(key).arg(ttl_ms(ttl));
        let n: i64 = self.query(key, &cmd).await?;
        Ok(n == 1)
    }

    async fn delete(&self, key: &str) -> BackendResult<bool> {
        let mut cmd = ::redis::cmd("DEL");
        cmd.arg(key);
        let n: i64 = self.query(key, &cmd).await?;
        Ok(n > 0)
    }

    async fn incr(&self, key: &str, delta: u64) -> BackendResult<u64> {
        let delta = i64::try_from(delta).map_err(|_| {
            BackendError::protocol(
                key,
                format!("increment {delta} is over Redis's 64-bit limit"),
            )
        })?;
        let mut cmd = ::redis::cmd("INCRBY");
        cmd.arg(key).arg(delta);
        let n: i64 = self.query(key, &cmd).await?;
        u64::try_from(n).map_err(|_| {
            BackendError::protocol(key, format!("counter holds a negative number ({n})"))
        })
    }

    async fn delete_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        _hold: Duration,
    ) -> BackendResult<TokenCheck> {
        let Some(native) = self.native_delete else {
            let mut invocation = DELETE_IF_EQ.prepare_invoke();
            invocation.key(key).arg(expected);
            let invocation = &invocation;
            let code: i64 = self
                .retrying(key, Instant::now(), move |mut conn: Conn| async move {
                    invocation.invoke_async::<i64>(&mut conn).await
                })
                .await?;
            return token_check(key, code);
        };
        let mut cmd = match native {
            NativeDelete::Delex => {
                let mut c = ::redis::cmd("DELEX");
                c.arg(key).arg("IFEQ").arg(expected);
                c
            }
            NativeDelete::DelIfEq => {
                let mut c = ::redis::cmd("DELIFEQ");
                c.arg(key).arg(expected);
                c
            }
        };
        if self.query::<i64>(key, &cmd).await? == 1 {
            return Ok(TokenCheck::Matched);
        }
        // "0" is both "absent" and "another value"; tell them apart.
        cmd = ::redis::cmd("EXISTS");
        cmd.arg(key);
        let exists: i64 = self.query(key, &cmd).await?;
        Ok(if exists > 0 {
            TokenCheck::Mismatch
        } else {
            TokenCheck::Missing
        })
    }

    async fn extend_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        ttl: Duration,
    ) -> BackendResult<TokenCheck> {
        let mut invocation = EXTEND_IF_EQ.prepare_invoke();
        invocation.key(key).arg(expected).arg(ttl_ms(ttl));
        let invocation = &invocation;
        let code: i64 = self
            .retrying(key, Instant::now(), move |mut conn: Conn| async move {
                invocation.invoke_async::<i64>(&mut conn).await
            })
            .await?;
        token_check(key, code)
    }

    async fn ttl(&self, key: &str) -> BackendResult<Option<Duration>> {
        let mut cmd = ::redis::cmd("PTTL");
        cmd.arg(key);
        let ms: i64 = self.query(key, &cmd).await?;
        // -2: absent; -1: no expiry (only counters made by incr).
        Ok(u64::try_from(ms).ok().map(Duration::from_millis))
    }

    fn atomic_token_ops(&self) -> bool {
        true
    }

    fn max_value_size(&self) -> usize {
        self.options.max_value_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_never_zero_and_rounds_up() {
        assert_eq!(ttl_ms(Duration::ZERO), 1);
        assert_eq!(ttl_ms(Duration::from_nanos(1)), 1);
        assert_eq!(ttl_ms(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_ms(Duration::from_secs(30)), 30_000);
        assert_eq!(ttl_ms(Duration::MAX), MAX_TTL_MS);
    }

    #[test]
    fn detects_native_delete_from_command_info() {
        let nil2 = Value::Array(vec![Value::Nil, Value::Nil]);
        assert_eq!(native_delete_from_command_info(&nil2), None);
        let info = Value::Array(vec![Value::BulkString(b"delex".to_vec())]);
        let delex = Value::Array(vec![info.clone(), Value::Nil]);
        assert_eq!(
            native_delete_from_command_info(&delex),
            Some(NativeDelete::Delex)
        );
        let delifeq = Value::Array(vec![Value::Nil, info]);
        assert_eq!(
            native_delete_from_command_info(&delifeq),
            Some(NativeDelete::DelIfEq)
        );
        assert_eq!(native_delete_from_command_info(&Value::Nil), None);
        assert_eq!(native_delete_from_command_info(&Value::Int(3)), None);
    }

    #[test]
    fn falls_back_to_resp2_only_when_resp3_is_missing() {
        let missing = RedisError::from((ErrorKind::RESP3NotSupported, "no HELLO"));
        assert!(lacks_resp3(&missing));
        let unknown = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "An error was signalled by the server",
            "unknown command 'HELLO'".to_owned(),
        ));
        assert!(lacks_resp3(&unknown));
        let noproto = ::redis::make_extension_error("NOPROTO".into(), Some("unsupported".into()));
        assert!(lacks_resp3(&noproto));
        let noauth = ::redis::make_extension_error(
            "NOAUTH".into(),
            Some("HELLO must be called with the client already authenticated".into()),
        );
        assert!(!lacks_resp3(&noauth));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!lacks_resp3(&io));
    }

    #[test]
    fn token_codes() {
        assert_eq!(token_check("k", 1).unwrap(), TokenCheck::Matched);
        assert_eq!(token_check("k", 0).unwrap(), TokenCheck::Mismatch);
        assert_eq!(token_check("k", -1).unwrap(), TokenCheck::Missing);
        assert!(matches!(
            token_check("k", 7),
            Err(BackendError::Protocol { .. })
        ));
    }
}
