//! The connection to Redis and its reconnect policy: a standalone
//! connection that is replaced when it stops answering, or the Cluster
//! client's connection.

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, ConnectionAddr, ConnectionInfo, Pipeline, RedisError, RedisFuture, Value};
use parking_lot::RwLock;
use tokio::time::Instant;

use super::RedisOptions;
use super::url::{bad_tls, bad_url, redact, short_redis_error};
use crate::error::BackendError;

/// The connection, standalone or Cluster. Cloning is cheap (an `Arc` or a
/// channel sender); each operation works on its own clone.
#[derive(Clone)]
pub(super) enum Conn {
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
pub(super) enum Link {
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
pub(super) struct SingleLink {
    client: ::redis::Client,
    config: ConnectionManagerConfig,
    /// The connection and its generation, bumped at each replacement.
    current: RwLock<(u64, ConnectionManager)>,
}

impl Link {
    /// The connection to use now, with its generation.
    pub(super) fn snapshot(&self) -> (u64, Conn) {
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
    pub(super) fn discard(&self, generation: u64) {
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

/// Opens a connection manager: one connect attempt, bounded. The inner
/// `Err` is the crate's error (to look at), the outer one a finished
/// [`BackendError`].
pub(super) async fn open_manager(
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
