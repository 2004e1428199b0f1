//! The connection to Redis and its reconnect policy: a standalone
//! connection of our own (its stream bounded by [`Limited`]) that is
//! replaced when it fails or stops answering, or the Cluster client's
//! connection, whose node connections ([`ClusterNode`]) read through
//! [`Limited`] too (except over TLS).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ::redis::aio::{AsyncPushSender, ConnectionLike, MultiplexedConnection, SendError};
use ::redis::cluster_async::{ClusterConnection, Connect};
use ::redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline,
    ProtocolVersion, PushInfo, PushKind, RedisError, RedisFuture, RedisResult, Value,
};
use parking_lot::RwLock;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::errors::is_limit_error;
use super::limit::Limited;
use super::url::redact;
use super::{REDIS_MAX_VALUE_SIZE, RedisOptions};
use crate::error::BackendError;

/// The connection, standalone or Cluster. Cloning is cheap (an `Arc` or a
/// channel sender); each operation works on its own clone.
#[derive(Clone)]
pub(super) enum Conn {
    Single(LazyConn),
    Cluster(ClusterConnection<ClusterNode>),
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
    Cluster(ClusterConnection<ClusterNode>),
}

/// A standalone connection that is replaced when it fails or stops
/// answering.
///
/// Each generation is one connection, opened lazily by the first operation
/// that needs it (concurrent operations share that one attempt) and
/// replaced ([`Link::discard`]) after an operation on it failed as
/// unavailable or timed out, or when the connection reported that it closed
/// (RESP3 only). The next operation then connects afresh: one bounded
/// attempt, so a server that is down fails operations fast. A connection
/// that merely stops answering (half-open TCP after a host or network
/// failure, a black-holed route) would otherwise time out every operation
/// until the kernel gives up on it, many minutes later; it is dropped after
/// its first timed-out reply, as redis-py does.
///
/// Connections are our own (`MultiplexedConnection` over a stream we open)
/// rather than the crate's `ConnectionManager`, so that every reply is read
/// through [`Limited`]: a wrong or hostile server cannot make the client
/// buffer more than the largest value it may legitimately return.
pub(super) struct SingleLink {
    dialer: Arc<Dialer>,
    /// The connection and its generation, bumped at each replacement.
    current: RwLock<(u64, LazyConn)>,
}

/// Where the master of a Sentinel-watched service is looked up.
pub(super) struct Sentinels {
    /// The Sentinels, asked in this order.
    pub(super) addrs: Vec<(String, u16)>,
    /// The service (master) name.
    pub(super) service: String,
}

/// Opens connections to one server: the one in `info`, or, with
/// `sentinel`, the master the Sentinels name at each connect (and only if
/// it says it is a master).
struct Dialer {
    info: ConnectionInfo,
    sentinel: Option<Sentinels>,
    tls: Option<tokio_rustls::TlsConnector>,
    connect_timeout: Duration,
    response_timeout: Duration,
    max_bulk: usize,
}

/// A stream to the server, TCP, TLS or Unix socket, with reads bounded.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<S: AsyncRead + AsyncWrite + Send + Unpin> Stream for S {}

impl Dialer {
    /// A stream to the server: for Sentinel, to the master named now.
    async fn stream(&self) -> io::Result<Pin<Box<dyn Stream>>> {
        match &self.sentinel {
            Some(sentinel) => {
                let (host, port) = self.master_addr(sentinel).await?;
                self.stream_to(&ConnectionAddr::Tcp(host, port)).await
            }
            None => self.stream_to(self.info.addr()).await,
        }
    }

    /// Asks each Sentinel in turn (`SENTINEL get-master-addr-by-name`) for
    /// the master's address; the first answer wins.
    async fn master_addr(&self, sentinel: &Sentinels) -> io::Result<(String, u16)> {
        let mut last = io::Error::other("no Sentinel was asked");
        for (host, port) in &sentinel.addrs {
            match self.ask_sentinel(host, *port, &sentinel.service).await {
                Ok(Some(addr)) => return Ok(addr),
                Ok(None) => {
                    last = io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "Sentinel {host}:{port} knows no master named {:?}",
                            sentinel.service
                        ),
                    );
                }
                Err(e) => {
                    tracing::debug!(sentinel = %format!("{host}:{port}"), error = %e, "Redis Sentinel did not answer");
                    last = io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("Sentinel {host}:{port}: {e}"),
                    );
                }
            }
        }
        Err(last)
    }

    /// One Sentinel's answer, bounded by the connect and response timeouts.
    async fn ask_sentinel(
        &self,
        host: &str,
        port: u16,
        service: &str,
    ) -> RedisResult<Option<(String, u16)>> {
        let timed_out =
            |what: &str| RedisError::from(io::Error::new(io::ErrorKind::TimedOut, what.to_owned()));
        let addr = ConnectionAddr::Tcp(host.to_owned(), port);
        let stream = tokio::time::timeout(self.connect_timeout, self.stream_to(&addr))
            .await
            .map_err(|_| timed_out("connect to the Sentinel timed out"))??;
        let settings = ::redis::RedisConnectionInfo::default().set_protocol(ProtocolVersion::RESP2);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout));
        let ask = async {
            let (mut conn, driver) =
                MultiplexedConnection::new_with_config(&settings, stream, config).await?;
            let driver = tokio::spawn(driver);
            let reply = ::redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(service)
                .query_async::<Option<(String, u16)>>(&mut conn)
                .await;
            drop(conn);
            driver.abort();
            reply
        };
        tokio::time::timeout(
            self.connect_timeout.saturating_add(self.response_timeout),
            ask,
        )
        .await
        .map_err(|_| timed_out("no answer from the Sentinel"))?
    }

    async fn stream_to(&self, addr: &ConnectionAddr) -> io::Result<Pin<Box<dyn Stream>>> {
        let limited = |s| Box::pin(Limited::new(s, self.max_bulk));
        match addr {
            ConnectionAddr::Tcp(host, port) => {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                tcp.set_nodelay(true)?;
                Ok(limited(Box::pin(tcp) as Pin<Box<dyn Stream>>))
            }
            ConnectionAddr::TcpTls { host, port, .. } => {
                let Some(tls) = &self.tls else {
                    return Err(io::Error::other("TLS is not set up"));
                };
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                tcp.set_nodelay(true)?;
                let stream = tls.connect(name, tcp).await?;
                Ok(limited(Box::pin(stream) as Pin<Box<dyn Stream>>))
            }
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => {
                let unix = tokio::net::UnixStream::connect(path).await?;
                Ok(limited(Box::pin(unix) as Pin<Box<dyn Stream>>))
            }
            other => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("unsupported Redis address {other}"),
            )),
        }
    }

    /// One connect attempt and handshake (`HELLO`, `AUTH`, `SELECT`),
    /// bounded by the connect and response timeouts.
    async fn open(&self, closed: Arc<AtomicBool>) -> RedisResult<MultiplexedConnection> {
        let timed_out =
            |what: &str| RedisError::from(io::Error::new(io::ErrorKind::TimedOut, what.to_owned()));
        let stream = tokio::time::timeout(self.connect_timeout, self.stream())
            .await
            .map_err(|_| timed_out("connect timed out"))??;
        let settings = self.info.redis_settings();
        let mut config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout));
        if settings.protocol() != ProtocolVersion::RESP2 {
            config = config.set_push_sender(ClosedFlag(closed));
        }
        let (conn, driver) = tokio::time::timeout(
            self.connect_timeout.saturating_add(self.response_timeout),
            MultiplexedConnection::new_with_config(settings, stream, config),
        )
        .await
        .map_err(|_| timed_out("no answer to the connection handshake"))??;
        tokio::spawn(driver);
        if self.sentinel.is_some() {
            self.check_master(conn.clone()).await?;
        }
        Ok(conn)
    }

    /// `ROLE` says `master`: a Sentinel may still name a master that a
    /// failover has just turned into a replica.
    async fn check_master(&self, mut conn: MultiplexedConnection) -> RedisResult<()> {
        let role = tokio::time::timeout(
            self.response_timeout,
            ::redis::cmd("ROLE").query_async::<Vec<Value>>(&mut conn),
        )
        .await
        .map_err(|_| {
            RedisError::from(io::Error::new(io::ErrorKind::TimedOut, "no answer to ROLE"))
        })??;
        match role.first() {
            Some(Value::BulkString(b)) if b.as_slice() == b"master" => Ok(()),
            Some(Value::SimpleString(s)) if s == "master" => Ok(()),
            _ => Err(RedisError::from(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the server the Sentinels named is not a master (a failover is under way)",
            ))),
        }
    }
}

/// The connect timeout of Cluster node connections, in milliseconds: the
/// longest [`RedisOptions::connect_timeout`] of any Cluster backend of this
/// process (0 before the first one).
///
/// A process-wide value because the crate opens node connections through
/// the static [`Connect::connect_with_config`], which gets the node's
/// address and an [`AsyncConnectionConfig`] whose connect timeout cannot be
/// read back, and no user data: there is no hook to pass a backend's own
/// settings. Taking the longest one never cuts a backend's connect attempt
/// short.
static CLUSTER_CONNECT_TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);

/// A connection to one Cluster node, opened by the `redis` crate's Cluster
/// client through [`Connect`], on a stream of our own read through
/// [`Limited`] (the same dialer as a standalone connection), so that a node
/// cannot make the client buffer more than the largest value.
///
/// [`Connect`] is a static function with no user data (see
/// [`CLUSTER_CONNECT_TIMEOUT_MS`]), so the bound is the largest value any
/// backend may read, [`REDIS_MAX_VALUE_SIZE`] (512 MiB), rather than the
/// backend's own [`RedisOptions::max_value_size`]; lines and aggregates have
/// the same limits as standalone. Over TLS the crate's own connection is
/// used (its TLS settings, given to the Cluster client, cannot be passed
/// here either), and is not bounded.
#[derive(Clone)]
pub(super) struct ClusterNode(MultiplexedConnection);

impl Connect for ClusterNode {
    fn connect_with_config<'a, T>(info: T, config: AsyncConnectionConfig) -> RedisFuture<'a, Self>
    where
        T: IntoConnectionInfo + Send + 'a,
    {
        Box::pin(async move {
            let info = info.into_connection_info()?;
            if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
                return Ok(Self(
                    MultiplexedConnection::connect_with_config(info, config).await?,
                ));
            }
            let connect_timeout = match CLUSTER_CONNECT_TIMEOUT_MS.load(Ordering::Relaxed) {
                0 => RedisOptions::default().connect_timeout,
                ms => Duration::from_millis(ms),
            };
            let dialer = Dialer {
                info,
                sentinel: None,
                tls: None,
                connect_timeout,
                // Not used here: the crate's `config` carries it.
                response_timeout: connect_timeout,
                max_bulk: REDIS_MAX_VALUE_SIZE,
            };
            let stream = tokio::time::timeout(connect_timeout, dialer.stream())
                .await
                .map_err(|_| {
                    RedisError::from(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
                })??;
            let (conn, driver) = MultiplexedConnection::new_with_config(
                dialer.info.redis_settings(),
                stream,
                config,
            )
            .await?;
            tokio::spawn(driver);
            Ok(Self(conn))
        })
    }
}

/// A reply refused by [`Limited`] is an I/O error, which the Cluster client
/// would answer by reconnecting and sending the command again, to the same
/// node and the same reply, until the response timeout. Its kind becomes
/// `Unsupported`, which the crate does not retry, and the operation fails
/// at once (as a protocol error, by its message).
fn no_retry_over_limit(e: RedisError) -> RedisError {
    if is_limit_error(&e) {
        RedisError::from(io::Error::new(io::ErrorKind::Unsupported, e.to_string()))
    } else {
        e
    }
}

impl ConnectionLike for ClusterNode {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.0
                .req_packed_command(cmd)
                .await
                .map_err(no_retry_over_limit)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.0
                .req_packed_commands(pipeline, offset, count)
                .await
                .map_err(no_retry_over_limit)
        })
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

/// Raises the connect timeout of Cluster node connections to `timeout` if
/// it is longer (see [`CLUSTER_CONNECT_TIMEOUT_MS`]).
pub(super) fn cluster_connect_timeout_at_least(timeout: Duration) {
    let ms = u64::try_from(timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    CLUSTER_CONNECT_TIMEOUT_MS.fetch_max(ms, Ordering::Relaxed);
}

/// Marks a connection closed when it says so (a RESP3 `Disconnection`
/// push from the crate), so that the next operation connects afresh
/// instead of failing on it.
struct ClosedFlag(Arc<AtomicBool>);

impl AsyncPushSender for ClosedFlag {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        if info.kind == PushKind::Disconnection {
            self.0.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// One generation's connection, opened on first use.
#[derive(Clone)]
pub(super) struct LazyConn {
    dialer: Arc<Dialer>,
    conn: Arc<tokio::sync::OnceCell<RedisResult<MultiplexedConnection>>>,
    closed: Arc<AtomicBool>,
}

impl LazyConn {
    fn new(dialer: Arc<Dialer>) -> Self {
        Self {
            dialer,
            conn: Arc::new(tokio::sync::OnceCell::new()),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A connection opened already, for the first generation.
    fn opened(dialer: Arc<Dialer>, conn: MultiplexedConnection, closed: Arc<AtomicBool>) -> Self {
        Self {
            dialer,
            conn: Arc::new(tokio::sync::OnceCell::new_with(Some(Ok(conn)))),
            closed,
        }
    }

    async fn get(&self) -> RedisResult<MultiplexedConnection> {
        self.conn
            .get_or_init(|| self.dialer.open(self.closed.clone()))
            .await
            .clone()
    }
}

impl ConnectionLike for LazyConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move { self.get().await?.req_packed_command(cmd).await })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.get()
                .await?
                .req_packed_commands(pipeline, offset, count)
                .await
        })
    }

    fn get_db(&self) -> i64 {
        self.dialer.info.redis_settings().db()
    }
}

impl Link {
    /// The connection to use now, with its generation.
    pub(super) fn snapshot(&self) -> (u64, Conn) {
        match self {
            Link::Single(single) => {
                let (generation, closed) = {
                    let current = single.current.read();
                    (current.0, current.1.closed.load(Ordering::Relaxed))
                };
                if closed {
                    self.discard(generation);
                }
                let current = single.current.read();
                (current.0, Conn::Single(current.1.clone()))
            }
            Link::Cluster(cluster) => (0, Conn::Cluster(cluster.clone())),
        }
    }

    /// Drops the standalone connection of `generation` after an operation
    /// on it failed as unavailable or timed out, or it closed (once, however
    /// many operations failed on it). The next operation connects again.
    pub(super) fn discard(&self, generation: u64) {
        let Link::Single(single) = self else {
            return;
        };
        let mut current = single.current.write();
        if current.0 != generation {
            return;
        }
        *current = (generation + 1, LazyConn::new(single.dialer.clone()));
        tracing::debug!("a Redis connection failed; it will be replaced");
    }
}

/// Builds the TLS client settings: the CA in `pem` if given, else the
/// system's root certificates.
fn tls_connector(pem: Option<&[u8]>) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("the TLS root certificate: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("the TLS root certificate: {e}"))?;
            }
        }
        None => {
            let loaded = rustls_native_certs::load_native_certs();
            for e in &loaded.errors {
                tracing::debug!(error = %e, "could not load a system root certificate");
            }
            let (added, _) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err("no system root certificates were found".into());
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Opens a standalone link: one connect attempt, bounded. The inner `Err`
/// is the crate's error (to look at), the outer one a finished
/// [`BackendError`].
pub(super) async fn open_single(
    url: &str,
    info: ConnectionInfo,
    sentinel: Option<Sentinels>,
    options: &RedisOptions,
) -> Result<SingleLink, Result<RedisError, BackendError>> {
    let tls = match info.addr() {
        ConnectionAddr::TcpTls { .. } => Some(
            tls_connector(options.tls_root_certificate.as_deref()).map_err(|why| {
                Err(BackendError::invalid_config(format!(
                    "cannot set up TLS for Redis at {}: {why}",
                    redact(url)
                )))
            })?,
        ),
        _ => None,
    };
    let dialer = Arc::new(Dialer {
        info,
        sentinel,
        tls,
        connect_timeout: options.connect_timeout,
        response_timeout: options.response_timeout,
        // The largest value, and room for the longest reply that is not a
        // value (`COMMAND INFO`, an error message).
        max_bulk: options.max_value_size.max(1 << 20),
    });
    let started = Instant::now();
    let closed = Arc::new(AtomicBool::new(false));
    let conn = tokio::time::timeout(
        options
            .connect_timeout
            .saturating_add(options.response_timeout),
        dialer.open(closed.clone()),
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
        current: RwLock::new((0, LazyConn::opened(dialer.clone(), conn, closed))),
        dialer,
    })
}

impl SingleLink {
    /// Opens a subscriber connection to the same server (RESP2: a
    /// connection in subscribe mode takes no other commands), bounded by
    /// the connect and response timeouts.
    pub(super) async fn open_pubsub(&self) -> RedisResult<::redis::aio::PubSub> {
        let d = &self.dialer;
        let timed_out =
            |what: &str| RedisError::from(io::Error::new(io::ErrorKind::TimedOut, what.to_owned()));
        let stream = tokio::time::timeout(d.connect_timeout, d.stream())
            .await
            .map_err(|_| timed_out("connect timed out"))??;
        let settings = d
            .info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP2);
        tokio::time::timeout(
            d.connect_timeout.saturating_add(d.response_timeout),
            ::redis::aio::PubSub::new(&settings, stream),
        )
        .await
        .map_err(|_| timed_out("no answer to the subscriber handshake"))?
    }

    /// The database number, which pub/sub channels do not separate.
    pub(super) fn db(&self) -> i64 {
        self.dialer.info.redis_settings().db()
    }
}
