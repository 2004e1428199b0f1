//! The Redis backend: one standalone server or a Redis Cluster.
//!
//! [`RedisBackend`] speaks to Redis through the `redis` crate's async
//! connections: for a standalone server one
//! [`MultiplexedConnection`](::redis::aio::MultiplexedConnection) over a
//! stream the backend opens itself (TCP, TLS with rustls, or a Unix socket)
//! and replaces when it fails, and for a Cluster the `cluster_async`
//! [`ClusterConnection`](::redis::cluster_async::ClusterConnection). Both sit
//! behind one private enum that implements the crate's `ConnectionLike`, so
//! every operation is written once.
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
//! | `add_queued` / `leave_queue` (a waiter in line) | a Lua script (`EVALSHA`) | 1 |
//! | `set_if` | `SET NX` when expecting absence, else a Lua script (GET, compare, SET); a GET then a SET where scripts are denied (not atomic) | 1 (2) |
//! | `add_reading` (memoize's first lock attempt) | the add's Lua script followed by a `GET` of each key (on a Cluster only when all keys share the lock key's slot; else the add, then `MGET`) | 1 (2) |
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
//!   unexpected shape → [`BackendError::Protocol`];
//! * a reply over the client's limits →
//!   [`BackendError::Protocol`], and the connection is dropped.
//!
//! # Bounded replies
//!
//! The `redis` crate's parser has no size limits, so a wrong or hostile
//! server could make it buffer gigabytes (a `$2000000000` header, a status
//! line that never ends). A standalone connection reads through a scanner
//! that follows the RESP framing and refuses, before buffering it, a bulk
//! string longer than the largest value ([`RedisOptions::max_value_size`],
//! at least 1 MiB), a line longer than 64 KiB or an aggregate of more than
//! 2^20 elements. Cluster node connections read through the same scanner,
//! with the bulk-string limit at 512 MiB whatever `max_value_size` says (the
//! crate opens them through a static function that cannot be given a
//! backend's settings); over TLS (`rediss://`) they are the crate's own and
//! are not bounded.
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
//! `?protocol=resp2` (or `resp3`): with RESP3 the connection hears of its
//! own disconnection at once, also while idle, and the next operation
//! connects afresh instead of failing on it. A server without RESP3 (before Redis 6, some proxies) is
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
//! A standalone connection is replaced after any operation on it failed as
//! unavailable, and after a reply that timed out: a
//! connection that stopped answering (half-open after a host or network
//! failure) would otherwise time out every operation until the kernel gives
//! up on it, many minutes later.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use ::redis::cluster_routing::Slot;
use ::redis::io::tcp::TcpSettings;
use ::redis::{Cmd, ConnectionAddr, ProtocolVersion, RedisError, Value};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::try_join_all;
use tokio::time::Instant;

use self::errors::{
    connect_error, connect_failed, finish_connect_error, is_limit_error, lacks_resp3, map_error,
};
use self::link::{
    ClusterNode, Conn, Link, Sentinels, cluster_connect_timeout_at_least, open_single,
};
use self::notify::RedisNotify;
use self::scripts::{
    ADD_FENCED, ADD_FENCED_READING, ADD_QUEUED, ADD_QUEUED_READING, DELETE_IF_EQ, EXTEND_IF_EQ,
    FENCE, LEAVE_QUEUE, NativeDelete, SET_IF_EQ, native_delete_from_command_info, token_check,
};
use self::url::{bad_url, parse_url, prepare, protocol_in_url, redact, short_redis_error};
use super::{
    AddRead, Backend, FENCE_TTL, Grant, HANDOFF_CLAIM, Listed, LockAdd, Queued, ReleaseWatch,
    TokenCheck, ValueFormat, add_then_read, check_value_size, fence_key, fence_key_same_slot,
    next_fence, queue_key,
};
use crate::backend::url::SentinelUrl;
use crate::error::{BackendError, BackendResult};

mod errors;
mod limit;
mod link;
mod notify;
mod options;
mod scripts;
mod url;
pub use self::options::{REDIS_MAX_VALUE_SIZE, RedisOptions};
pub use self::url::check_url;

/// The longest TTL sent to the server: 100 years, in milliseconds.
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

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
    /// Release notices over pub/sub (standalone only).
    notify: Option<RedisNotify>,
    /// Cleared when the server cannot run the wait-queue script (no `LPOS`,
    /// before Redis 6.0.6): waiters then race for a released lock.
    queue: std::sync::atomic::AtomicBool,
    /// Set when the server denied a script (`NOPERM`, an ACL without
    /// `EVALSHA`): the lock's add then sends plain commands.
    scripts_denied: std::sync::atomic::AtomicBool,
}

/// The most waiters in one lock's queue; later ones race as without one.
const MAX_QUEUED: usize = 1024;

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
        Self::connect_single(url, url, info, None, options).await
    }

    /// Connects to the master of a service watched by Redis Sentinel
    /// (`redis+sentinel://` URLs), with the default [`RedisOptions`].
    ///
    /// Each connection, the first and every one after a failure, asks the
    /// Sentinels in turn for the master's address and checks with `ROLE`
    /// that the server is a master, so after a failover the backend moves to
    /// the new master at its next operation. Sentinels are asked without
    /// credentials and without TLS; the URL's credentials and database are
    /// the master's.
    ///
    /// # Errors
    ///
    /// As for [`connect`](Self::connect): [`BackendError::Connect`] also if
    /// no Sentinel answers, none knows the service, or the server named is
    /// not a master.
    pub async fn connect_sentinel(target: &SentinelUrl) -> BackendResult<Self> {
        Self::connect_sentinel_with(target, RedisOptions::default()).await
    }

    /// Connects through Redis Sentinel with the given options.
    ///
    /// # Errors
    ///
    /// As for [`connect_sentinel`](Self::connect_sentinel).
    pub async fn connect_sentinel_with(
        target: &SentinelUrl,
        options: RedisOptions,
    ) -> BackendResult<Self> {
        options.validate()?;
        let shown = target.to_string();
        let settings_url = target.master_settings_url();
        let info = prepare(parse_url(settings_url)?);
        let sentinel = Sentinels {
            addrs: target.sentinels().to_vec(),
            service: target.service().to_owned(),
        };
        Self::connect_single(&shown, settings_url, info, Some(sentinel), options).await
    }

    /// Connects one standalone link (`shown` names it in messages, `url` is
    /// what it was parsed from).
    async fn connect_single(
        shown: &str,
        url: &str,
        info: ::redis::ConnectionInfo,
        sentinel: Option<Sentinels>,
        options: RedisOptions,
    ) -> BackendResult<Self> {
        let started = Instant::now();
        let manager = if protocol_in_url(url) {
            open_single(shown, info, sentinel, &options)
                .await
                .map_err(|e| finish_connect_error(shown, e, started))?
        } else {
            // RESP3 lets the manager see a dropped connection at once, even
            // while idle, and reconnect before the next operation; without
            // it the first operation after a server restart fails. Servers
            // older than Redis 6 (and some proxies) lack `HELLO 3`: RESP2.
            let settings = info.redis_settings().clone();
            let resp3 = info
                .clone()
                .set_redis_settings(settings.clone().set_protocol(ProtocolVersion::RESP3));
            let again = sentinel.as_ref().map(|s| Sentinels {
                addrs: s.addrs.clone(),
                service: s.service.clone(),
            });
            match open_single(shown, resp3, sentinel, &options).await {
                Err(Ok(e)) if lacks_resp3(&e) => {
                    tracing::debug!(url = %redact(shown), error = %e, "Redis has no RESP3; using RESP2");
                    let resp2 = info.set_redis_settings(settings.set_protocol(ProtocolVersion::RESP2));
                    open_single(shown, resp2, again, &options).await
                }
                other => other,
            }
            .map_err(|e| finish_connect_error(shown, e, started))?
        };
        let url = shown;
        let notify = Some(RedisNotify::new(manager.db()));
        let mut backend = Self {
            link: Link::Single(Box::new(manager)),
            options,
            urls: vec![redact(url)],
            native_delete: None,
            set_nx_get: std::sync::atomic::AtomicBool::new(true),
            notify,
            queue: std::sync::atomic::AtomicBool::new(true),
            scripts_denied: std::sync::atomic::AtomicBool::new(false),
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
        cluster_connect_timeout_at_least(options.connect_timeout);
        let started = Instant::now();
        let conn = tokio::time::timeout(
            options
                .connect_timeout
                .saturating_add(options.response_timeout),
            client.get_async_generic_connection::<ClusterNode>(),
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
            notify: None,
            queue: std::sync::atomic::AtomicBool::new(false),
            scripts_denied: std::sync::atomic::AtomicBool::new(false),
        };
        backend.native_delete = backend
            .detect_native_delete()
            .await
            .map_err(|e| connect_failed(&backend.urls.join(","), e))?;
        tracing::debug!(urls = ?backend.urls, native_delete = ?backend.native_delete, "connected to Redis Cluster");
        Ok(backend)
    }

    /// The pub/sub channel a release of `key` is announced on.
    fn release_channel(&self, key: &str) -> String {
        match &self.notify {
            Some(n) => n.channel(key),
            None => RedisNotify::channel_for(0, key),
        }
    }

    /// Notes our release of `key`, whose notice reached `subscribers`.
    fn released(&self, key: &str, subscribers: i64) {
        if let Some(n) = &self.notify {
            n.released(key, usize::try_from(subscribers).unwrap_or(0));
        }
    }

    /// Whether releases hand the lock to the first waiter in line: a
    /// standalone server whose releases go through the script (not a native
    /// compare-and-delete) and that can run the queue script.
    fn queues(&self) -> bool {
        self.notify.is_some()
            && self.native_delete.is_none()
            && self.queue.load(std::sync::atomic::Ordering::Relaxed)
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
    /// `link::SingleLink`).
    async fn retrying<T, F, Fut>(&self, key: &str, started: Instant, op: F) -> BackendResult<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        // The crate bounds each connect and each reply; this outer limit
        // only guards against a wait the crate does not bound.
        let limit = self
            .options
            .connect_timeout
            .saturating_mul(2)
            .saturating_add(self.options.response_timeout);
        let (mut generation, conn) = self.link.snapshot();
        let run = async {
            match op(conn).await {
                Err(e) if e.is_connection_refusal() && !self.is_cluster() => {
                    tracing::debug!(%key, error = %e, "Redis connection refused; retrying once on a new connection");
                    self.link.discard(generation);
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
                // A connection that failed (refused, broken, its handshake
                // cut mid-way or answered LOADING, a reply over the limits)
                // is replaced: the next operation connects afresh. An error
                // reply (WRONGTYPE, ...) leaves it in use.
                let broken = mapped.is_unavailable() || is_limit_error(&e);
                (mapped, broken)
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

    /// Runs `cmd` on the standalone server, or on the Cluster node `node`
    /// (`host`, `port`).
    async fn on_node<T: ::redis::FromRedisValue>(
        &self,
        key: &str,
        cmd: &Cmd,
        node: Option<&(String, u16)>,
    ) -> BackendResult<T> {
        let Some((host, port)) = node else {
            return self.query(key, cmd).await;
        };
        let started = Instant::now();
        self.retrying(key, started, move |conn: Conn| async move {
            let Conn::Cluster(mut cluster) = conn else {
                return cmd.query_async::<T>(&mut conn.clone()).await;
            };
            let routing = ::redis::cluster_routing::RoutingInfo::SingleNode(
                ::redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                },
            );
            let value = cluster.route_command(cmd.clone(), routing).await?;
            ::redis::FromRedisValue::from_redis_value(value).map_err(RedisError::from)
        })
        .await
    }

    /// The Cluster's masters (`host`, `port`), from `CLUSTER NODES`.
    async fn cluster_masters(&self, key: &str) -> BackendResult<Vec<(String, u16)>> {
        let nodes: String = self
            .query(key, &::redis::cmd("CLUSTER").arg("NODES").clone())
            .await?;
        let masters: Vec<(String, u16)> = nodes
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let addr = fields.nth(1)?;
                let flags = fields.next()?;
                if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                    return None;
                }
                // `host:port@cport[,hostname]`
                let addr = addr.split(['@', ',']).next()?;
                let (host, port) = addr.rsplit_once(':')?;
                Some((host.to_owned(), port.parse().ok()?))
            })
            .collect();
        if masters.is_empty() {
            return Err(BackendError::protocol(key, "CLUSTER NODES named no master"));
        }
        Ok(masters)
    }

    /// Runs `script` with `keys` and `args`, returning its integer reply.
    async fn script_i64(
        &self,
        key: &str,
        script: &::redis::Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> BackendResult<i64> {
        self.script(key, script, keys, args).await
    }

    /// Runs `script` with `keys` and `args`.
    async fn script<T: ::redis::FromRedisValue>(
        &self,
        key: &str,
        script: &::redis::Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> BackendResult<T> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(*k);
        }
        for a in args {
            invocation.arg(*a);
        }
        let invocation = &invocation;
        self.retrying(key, Instant::now(), move |mut conn: Conn| async move {
            invocation.invoke_async::<T>(&mut conn).await
        })
        .await
    }

    /// The add, then the fence as a second step: for a Cluster key whose
    /// counter is in another slot, and where scripts are denied (then with
    /// plain `INCR`, `TIME`, `SET`, `PEXPIRE`). The increment happens while
    /// we hold the lock, so the numbers still rise in grant order.
    async fn add_then_fence(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        counter_key: &str,
    ) -> BackendResult<Option<Grant>> {
        use std::sync::atomic::Ordering;
        if !self.add(key, value, ttl).await? {
            return Ok(None);
        }
        let fence_ttl = ttl_ms(FENCE_TTL).to_string();
        let fence = if self.scripts_denied.load(Ordering::Relaxed) {
            let counter = self.incr(counter_key, 1).await?;
            let (secs, micros): (u64, u64) = self.query(key, &::redis::cmd("TIME")).await?;
            let floor = secs.saturating_mul(1_000_000).saturating_add(micros);
            let fence = next_fence(counter, floor);
            if fence > counter {
                let mut cmd = ::redis::cmd("SET");
                cmd.arg(counter_key).arg(fence);
                self.query::<()>(counter_key, &cmd).await?;
            }
            self.touch(counter_key, FENCE_TTL).await?;
            fence
        } else {
            let n = self
                .script_i64(counter_key, &FENCE, &[counter_key], &[fence_ttl.as_bytes()])
                .await?;
            fence_from_reply(key, n)?
        };
        Ok(Some(Grant {
            fence,
            version: None,
        }))
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

    /// On a standalone server, one script: the add and its fence, or a
    /// place at the end of the lock's wait queue (the `ADD_QUEUED` script;
    /// a release hands the lock straight to the first in line, see the
    /// lock's module docs). Elsewhere (Cluster, a native compare-and-delete,
    /// scripts denied) as [`add_fenced`](Backend::add_fenced).
    async fn add_queued(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<Queued> {
        use std::sync::atomic::Ordering;
        let unqueued = |grant: Option<Grant>| match grant {
            Some(grant) => Queued::Granted(grant),
            None => Queued::Held { latest_fence: None },
        };
        if !self.queues() || self.scripts_denied.load(Ordering::Relaxed) {
            return self
                .add_fenced(key, value, ttl, ValueFormat::Raw)
                .await
                .map(unqueued);
        }
        check_value_size(key, value, self.max_value_size())?;
        let (queue, counter_key) = (queue_key(key), fence_key(key));
        let (lease, max, fence_ttl, claim) = (
            ttl_ms(ttl).to_string(),
            MAX_QUEUED.to_string(),
            ttl_ms(FENCE_TTL).to_string(),
            claim_ms(ttl),
        );
        let reply = self
            .script_i64(
                key,
                &ADD_QUEUED,
                &[key, &queue, &counter_key],
                &[
                    value,
                    lease.as_bytes(),
                    max.as_bytes(),
                    fence_ttl.as_bytes(),
                    claim.as_bytes(),
                ],
            )
            .await;
        match reply {
            // Held; the reply is the latest grant's fence, negated.
            Ok(n) if n <= 0 => Ok(Queued::Held {
                latest_fence: Some(n.unsigned_abs()),
            }),
            Ok(n) => Ok(Queued::Granted(Grant {
                fence: fence_from_reply(key, n)?,
                version: None,
            })),
            Err(BackendError::Protocol { message, .. })
                if message.to_ascii_lowercase().contains("unknown") || is_noperm(&message) =>
            {
                tracing::debug!(error = %message, "Redis cannot run the wait-queue script; waiters race");
                self.queue.store(false, Ordering::Relaxed);
                self.add_fenced(key, value, ttl, ValueFormat::Raw)
                    .await
                    .map(unqueued)
            }
            Err(e) => Err(e),
        }
    }

    /// One script (`LEAVE_QUEUE`): out of the queue, and if a release
    /// already handed us the lock, handed on to the next in line.
    async fn leave_queue(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<()> {
        use std::sync::atomic::Ordering;
        if !self.queues() || self.scripts_denied.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (queue, counter_key) = (queue_key(key), fence_key(key));
        let (claim, fence_ttl) = (claim_ms(ttl), ttl_ms(FENCE_TTL).to_string());
        let channel = self.release_channel(key);
        let gave_up = self
            .script_i64(
                key,
                &LEAVE_QUEUE,
                &[key, &queue, &counter_key],
                &[
                    value,
                    claim.as_bytes(),
                    channel.as_bytes(),
                    fence_ttl.as_bytes(),
                ],
            )
            .await?;
        if gave_up == 1 {
            tracing::debug!(%key, "a waiter that stopped waiting gave up the lock it was handed");
        }
        Ok(())
    }

    /// One script (`EVALSHA`): `SET NX PX`, then `INCR` of the fence
    /// counter raised to the server's `TIME`. Where scripts are denied by
    /// ACL, plain commands in several round trips. `format` changes
    /// nothing here (the value is already encoded).
    async fn add_fenced(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        _format: ValueFormat,
    ) -> BackendResult<Option<Grant>> {
        use std::sync::atomic::Ordering;
        check_value_size(key, value, self.max_value_size())?;
        let counter_key = fence_key(key);
        if self.scripts_denied.load(Ordering::Relaxed)
            || (self.is_cluster() && !fence_key_same_slot(key))
        {
            return self.add_then_fence(key, value, ttl, &counter_key).await;
        }
        let (lease, fence_ttl) = (ttl_ms(ttl).to_string(), ttl_ms(FENCE_TTL).to_string());
        let reply = self
            .script_i64(
                key,
                &ADD_FENCED,
                &[key, &counter_key],
                &[value, lease.as_bytes(), fence_ttl.as_bytes()],
            )
            .await;
        match reply {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(Grant {
                fence: fence_from_reply(key, n)?,
                version: None,
            })),
            Err(BackendError::Protocol { message, .. }) if is_noperm(&message) => {
                tracing::warn!(
                    error = %message,
                    "Redis denies scripts (EVALSHA) to this user; the lock's add now takes \
                     several round trips, and owner-checked release needs DELEX/DELIFEQ"
                );
                self.scripts_denied.store(true, Ordering::Relaxed);
                self.add_then_fence(key, value, ttl, &counter_key).await
            }
            Err(e) => Err(e),
        }
    }

    /// One script (`EVALSHA`) where it can: the add of `ADD_FENCED` (or
    /// `ADD_QUEUED`, where waiters queue), then a `GET` of each key, on a
    /// standalone server, or on a Cluster when the lock key, its fence
    /// counter and all the keys share one hash slot. Otherwise (keys in
    /// several slots, scripts denied) the add, then `MGET`.
    async fn add_reading(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        add: LockAdd,
        keys: &[&str],
    ) -> BackendResult<AddRead> {
        use std::sync::atomic::Ordering;
        let counter_key = fence_key(key);
        let one_slot = !self.is_cluster() || {
            let slot = Slot::for_key(key);
            Slot::for_key(&counter_key) == slot && keys.iter().all(|k| Slot::for_key(k) == slot)
        };
        if keys.is_empty() || !one_slot || self.scripts_denied.load(Ordering::Relaxed) {
            return add_then_read(self, key, value, ttl, add, keys).await;
        }
        check_value_size(key, value, self.max_value_size())?;
        let queued = add == LockAdd::Queued && self.queues();
        let (lease, fence_ttl) = (ttl_ms(ttl).to_string(), ttl_ms(FENCE_TTL).to_string());
        let reply = if queued {
            let (queue, max) = (queue_key(key), MAX_QUEUED.to_string());
            let mut script_keys = vec![key, &queue, &counter_key];
            script_keys.extend_from_slice(keys);
            let claim = claim_ms(ttl);
            let args: [&[u8]; 5] = [
                value,
                lease.as_bytes(),
                max.as_bytes(),
                fence_ttl.as_bytes(),
                claim.as_bytes(),
            ];
            self.script::<Value>(key, &ADD_QUEUED_READING, &script_keys, &args)
                .await
        } else {
            let mut script_keys = vec![key, &counter_key];
            script_keys.extend_from_slice(keys);
            let args: [&[u8]; 3] = [value, lease.as_bytes(), fence_ttl.as_bytes()];
            self.script::<Value>(key, &ADD_FENCED_READING, &script_keys, &args)
                .await
        };
        match reply {
            Ok(reply) => add_read_from_reply(key, keys.len(), queued, reply),
            // Denied or unknown to this server: the plain add finds out
            // again, remembers it and falls back as it always does.
            Err(BackendError::Protocol { message, .. })
                if is_noperm(&message) || message.to_ascii_lowercase().contains("unknown") =>
            {
                add_then_read(self, key, value, ttl, add, keys).await
            }
            Err(e) => Err(e),
        }
    }

    /// `None`: the add (`SET NX`). Otherwise the `SET_IF_EQ` script (GET,
    /// compare, SET PX). Where the server denies scripts (`NOPERM`), the
    /// non-atomic default (GET, compare, SET): a write between the two can
    /// be overwritten.
    async fn set_if(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Duration,
    ) -> BackendResult<bool> {
        use std::sync::atomic::Ordering;
        let Some(expected) = expected else {
            return self.add(key, value, ttl).await;
        };
        check_value_size(key, value, self.max_value_size())?;
        let unscripted = async {
            match self.get(key).await? {
                Some(v) if v.as_ref() == expected => {
                    self.set(key, value, ttl).await?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        };
        if self.scripts_denied.load(Ordering::Relaxed) {
            return unscripted.await;
        }
        let ms = ttl_ms(ttl).to_string();
        match self
            .script_i64(key, &SET_IF_EQ, &[key], &[expected, value, ms.as_bytes()])
            .await
        {
            Ok(1) => Ok(true),
            Ok(0) => Ok(false),
            Ok(other) => Err(BackendError::protocol(
                key,
                format!("unexpected reply {other} from a compare-and-set"),
            )),
            Err(BackendError::Protocol { message, .. }) if is_noperm(&message) => {
                tracing::warn!(
                    error = %message,
                    "Redis denies scripts (EVALSHA) to this user; memoize's compare-and-set \
                     is now a read then a write (not atomic)"
                );
                self.scripts_denied.store(true, Ordering::Relaxed);
                unscripted.await
            }
            Err(e) => Err(e),
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
            invocation.key(key);
            if self.queues() {
                invocation.key(queue_key(key)).key(fence_key(key));
            }
            invocation
                .arg(expected)
                .arg(self.release_channel(key))
                .arg(ttl_ms(FENCE_TTL));
            let invocation = &invocation;
            let code: i64 = self
                .retrying(key, Instant::now(), move |mut conn: Conn| async move {
                    invocation.invoke_async::<i64>(&mut conn).await
                })
                .await?;
            if code >= 1 {
                self.released(key, code - 1);
                return Ok(TokenCheck::Matched);
            }
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
            // Announced right after the delete (one more round trip).
            let mut publish = ::redis::cmd("PUBLISH");
            publish.arg(self.release_channel(key)).arg("");
            match self.query::<i64>(key, &publish).await {
                Ok(n) => self.released(key, n),
                Err(e) => {
                    tracing::debug!(%key, error = %e, "release notice not sent; waiters poll")
                }
            }
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

    /// `SCAN 0 MATCH <prefix>* COUNT 1000` until the cursor comes back to 0
    /// (on a Cluster, on every master, found with `CLUSTER NODES`), then
    /// `GET` and `PTTL` of each key found.
    async fn list(&self, prefix: &str, limit: usize) -> BackendResult<Vec<Listed>> {
        let pattern = format!("{}*", glob_escape(prefix));
        let masters = match &self.link {
            Link::Single(_) => vec![None],
            Link::Cluster(_) => self
                .cluster_masters(prefix)
                .await?
                .into_iter()
                .map(Some)
                .collect(),
        };
        let mut keys: Vec<String> = Vec::new();
        'nodes: for node in masters {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = ::redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, found): (u64, Vec<Vec<u8>>) =
                    self.on_node(prefix, &cmd, node.as_ref()).await?;
                // Keys that are not UTF-8 are not ours (ours are `&str`).
                for key in found.into_iter().filter_map(|k| String::from_utf8(k).ok()) {
                    if keys.len() >= limit {
                        break 'nodes;
                    }
                    keys.push(key);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        let mut listed = Vec::with_capacity(keys.len());
        for key in keys {
            // Gone since the scan: skipped.
            let Some(value) = self.get(&key).await? else {
                continue;
            };
            let ttl = self.ttl(&key).await?;
            listed.push(Listed { key, value, ttl });
        }
        Ok(listed)
    }

    /// Pub/sub on a standalone server (see the module docs); a Cluster
    /// backend polls.
    async fn watch_release(&self, key: &str) -> ReleaseWatch {
        match (&self.notify, &self.link) {
            (Some(notify), Link::Single(single)) => notify.watch(single, key).await,
            _ => ReleaseWatch::polling(),
        }
    }

    fn watch_release_now(&self, key: &str) -> Option<ReleaseWatch> {
        match (&self.notify, &self.link) {
            (Some(notify), Link::Single(_)) => notify.watch_subscribed(key),
            _ => None,
        }
    }

    /// With a wait queue the lock goes to the first waiter in line, and the
    /// releaser needs no grace; otherwise (a native compare-and-delete) the
    /// releaser stays out for the grace.
    fn handed_off_at(&self, key: &str) -> Option<Instant> {
        if self.queues() {
            return None;
        }
        self.notify.as_ref()?.handed_off_at(key)
    }

    fn atomic_token_ops(&self) -> bool {
        true
    }

    fn max_value_size(&self) -> usize {
        self.options.max_value_size
    }
}

/// `s` with the glob characters of `SCAN MATCH` escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Whether an error reply says the ACL denies the command.
fn is_noperm(message: &str) -> bool {
    message.contains("NOPERM") || message.to_ascii_lowercase().contains("no permissions")
}

/// A fence from a script's reply (always positive).
/// Reads the reply of the `..._READING` scripts: `{fence, values}` (fence
/// 0: held), or `{fence, message}` when the read failed.
/// Reads the reply of an add-and-read script: `{fence, values}`. The fence
/// is as [`ADD_QUEUED`]'s reply when `queued` (≤ 0: held, the latest
/// grant's fence negated), else as [`ADD_FENCED`]'s (0: held).
fn add_read_from_reply(
    key: &str,
    count: usize,
    queued: bool,
    reply: Value,
) -> BackendResult<AddRead> {
    let shape =
        || BackendError::protocol(key, "unexpected reply shape from the add-and-read script");
    let Value::Array(items) = reply else {
        return Err(shape());
    };
    let mut items = items.into_iter();
    let (Some(Value::Int(fence)), Some(read), None) = (items.next(), items.next(), items.next())
    else {
        return Err(shape());
    };
    let outcome = match fence {
        n if n <= 0 && queued => Queued::Held {
            latest_fence: Some(n.unsigned_abs()),
        },
        0 => Queued::Held { latest_fence: None },
        n => Queued::Granted(Grant {
            fence: fence_from_reply(key, n)?,
            version: None,
        }),
    };
    let values = match read {
        Value::Array(values) if values.len() == count => values
            .into_iter()
            .map(|v| match v {
                Value::Nil | Value::Boolean(false) => Ok(None),
                Value::BulkString(b) => Ok(Some(Bytes::from(b))),
                _ => Err(shape()),
            })
            .collect(),
        Value::BulkString(message) => Err(BackendError::protocol(
            key,
            format!(
                "reading after the lock's add failed: {}",
                String::from_utf8_lossy(&message)
            ),
        )),
        _ => Err(shape()),
    };
    Ok(AddRead { outcome, values })
}

/// The TTL, in ms, a release hands the lock to a waiter with lease `ttl`
/// for: the lease or [`HANDOFF_CLAIM`], whichever is shorter.
fn claim_ms(ttl: Duration) -> String {
    ttl_ms(ttl.min(HANDOFF_CLAIM)).to_string()
}

fn fence_from_reply(key: &str, n: i64) -> BackendResult<u64> {
    u64::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| BackendError::protocol(key, format!("fence script replied {n}")))
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
}
