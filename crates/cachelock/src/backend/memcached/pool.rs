//! The pooled tokio transport: a few TCP connections per server.
//!
//! Each request (or pipelined batch) borrows one connection, writes the
//! whole batch in one write, reads until every reply has arrived, and gives
//! the connection back. A connection goes back to the pool only after a
//! clean exchange: any I/O error, timeout, parse error, error line from the
//! server, or a cancelled future drops it, so a connection is never reused
//! out of step. After an I/O error all idle connections to that server are
//! dropped too (the server probably went away), and idle connections are
//! checked for a close by the server before reuse, so the first operation
//! after a server restart opens a fresh connection.
//!
//! Connections are opened lazily with `TCP_NODELAY`, within the connect
//! timeout; at most `max_connections` are in use per server at once
//! (further callers wait for one, within the response timeout).
//!
//! Each connection gets a sequence number when it is established (rising
//! per pool), which [`Pool::request_tagged`] reports and
//! [`Pool::request_pinned`] uses to pick a connection that was already open
//! when a given earlier exchange ran: see the backend's `delete_if_version`
//! for why that makes a CAS safe to send.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::proto::{self, ProtoError, Response};
use crate::error::{BackendError, BackendResult};

/// How a pipelined exchange ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// After this many replies (one per command; no quiet mode).
    Count(usize),
}

/// Read buffers larger than this are not kept with an idle connection.
const KEEP_BUFFER: usize = 256 * 1024;
/// How much room to make in the read buffer before each read.
const READ_CHUNK: usize = 64 * 1024;

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// Assigned once the connection was established; rises per pool.
    seq: u64,
}

impl Conn {
    /// False if the server closed the connection (or sent something
    /// unasked) while it sat idle.
    fn looks_alive(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Why an exchange failed.
enum Failure {
    Io(io::Error),
    Closed,
    Proto(ProtoError),
    Timeout,
}

/// The connections to one server.
pub(crate) struct Pool {
    addr: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
    /// The next connection's sequence number, and the peers seen.
    seqs: Mutex<Seqs>,
}

/// Connection numbering.
#[derive(Debug, Default)]
struct Seqs {
    /// The last number handed out (the first connection gets 1).
    last: u64,
    /// The peer address of the last connection.
    peer: Option<SocketAddr>,
    /// The number of the last connection whose peer address differed from
    /// the one before (a name that resolved elsewhere): connections
    /// numbered before it may lead to another server.
    peer_changed_at: u64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("addr", &self.addr)
            .field("idle", &self.idle.lock().len())
            .field("available", &self.permits.available_permits())
            .finish()
    }
}

/// A frame the transport can read: a meta reply or a whole stats reply.
trait Frame: Sized {
    fn parse(buf: &[u8], max_value_len: usize) -> Result<Option<(Self, usize)>, ProtoError>;
    /// Whether the connection may be reused after this frame.
    fn clean(&self) -> bool;
}

impl Frame for Response {
    fn parse(buf: &[u8], max_value_len: usize) -> Result<Option<(Self, usize)>, ProtoError> {
        proto::parse_with_limit(buf, max_value_len)
    }
    fn clean(&self) -> bool {
        !matches!(self, Response::Error { .. })
    }
}

type Stats = Vec<(String, String)>;

impl Frame for Stats {
    fn parse(buf: &[u8], _: usize) -> Result<Option<(Self, usize)>, ProtoError> {
        proto::parse_stats(buf)
    }
    fn clean(&self) -> bool {
        true
    }
}

impl Pool {
    pub(crate) fn new(
        addr: String,
        connect_timeout: Duration,
        response_timeout: Duration,
        max_connections: usize,
    ) -> Self {
        Self {
            addr,
            connect_timeout,
            response_timeout,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max_connections.max(1)),
            seqs: Mutex::new(Seqs::default()),
        }
    }

    /// The server's address, as given.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `request` (one or more pipelined commands) and reads the
    /// replies. `key` names the operation in errors. With `retry_reads`,
    /// a request that failed on a reused connection with an I/O error is
    /// sent once more on a fresh one; only pass it for requests that are
    /// safe to repeat (reads).
    ///
    /// `max_value_len` bounds each value block in the replies: what the
    /// request can legitimately get back (0 for a request that returns no
    /// value). A reply announcing more is a protocol error, found before its
    /// bytes are read, and the connection is dropped: a wrong or hostile
    /// server cannot make the client buffer more than that.
    pub(crate) async fn request(
        &self,
        key: &str,
        request: &[u8],
        until: Until,
        retry_reads: bool,
        max_value_len: usize,
    ) -> BackendResult<Vec<Response>> {
        self.run(key, request, until, retry_reads, max_value_len)
            .await
            .map(|(frames, _)| frames)
    }

    /// [`request`](Self::request) (never retried) that also reports the
    /// sequence number of the connection the exchange ran on.
    pub(crate) async fn request_tagged(
        &self,
        key: &str,
        request: &[u8],
        until: Until,
        max_value_len: usize,
    ) -> BackendResult<(Vec<Response>, u64)> {
        self.run(key, request, until, false, max_value_len).await
    }

    /// Sends `request` over an idle connection numbered `session` or lower
    /// (and to the same peer address as `session`), that is, one that was
    /// already established when the exchange [`request_tagged`] numbered
    /// `session` was sent. `Ok(None)`: there is no such connection (all
    /// closed or busy), or it turned out dead before a reply came (closed,
    /// reset): then the request reached no server process that is still
    /// running, and the caller takes another path. Never retried.
    ///
    /// [`request_tagged`]: Self::request_tagged
    pub(crate) async fn request_pinned(
        &self,
        key: &str,
        request: &[u8],
        until: Until,
        max_value_len: usize,
        session: u64,
    ) -> BackendResult<Option<Vec<Response>>> {
        let _permit = self.permit(key).await?;
        let Some(mut conn) = self.take_idle_pinned(session) else {
            return Ok(None);
        };
        match self
            .exchange::<Response>(&mut conn, request, until, max_value_len)
            .await
        {
            Ok((frames, clean)) => {
                if clean {
                    self.put_idle(conn);
                }
                Ok(Some(frames))
            }
            Err(Failure::Io(_) | Failure::Closed) => {
                tracing::debug!(addr = %self.addr, "pinned memcached connection was dead");
                self.purge();
                Ok(None)
            }
            Err(failure) => Err(self.fail(key, failure)),
        }
    }

    /// Asks `stats settings`.
    pub(crate) async fn stats_settings(&self) -> BackendResult<Stats> {
        let mut req = Vec::new();
        proto::encode_stats_settings(&mut req);
        let (mut frames, _): (Vec<Stats>, _) = self.run("", &req, Until::Count(1), true, 0).await?;
        Ok(frames.pop().unwrap_or_default())
    }

    async fn permit(&self, key: &str) -> BackendResult<tokio::sync::SemaphorePermit<'_>> {
        match tokio::time::timeout(self.response_timeout, self.permits.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(self.unavailable(key, "connection pool closed")),
            Err(_) => Err(BackendError::TimedOut {
                key: key.to_owned(),
                after: self.response_timeout,
            }),
        }
    }

    async fn run<F: Frame>(
        &self,
        key: &str,
        request: &[u8],
        until: Until,
        retry_reads: bool,
        max_value_len: usize,
    ) -> BackendResult<(Vec<F>, u64)> {
        let _permit = self.permit(key).await?;
        let (mut conn, reused) = match self.take_idle() {
            Some(conn) => (conn, true),
            None => (self.connect(key).await?, false),
        };
        let mut outcome = self
            .exchange(&mut conn, request, until, max_value_len)
            .await;
        if reused && retry_reads && matches!(outcome, Err(Failure::Io(_) | Failure::Closed)) {
            tracing::debug!(addr = %self.addr, "pooled memcached connection was dead; retrying on a fresh one");
            self.purge();
            conn = self.connect(key).await?;
            outcome = self
                .exchange(&mut conn, request, until, max_value_len)
                .await;
        }
        match outcome {
            Ok((frames, clean)) => {
                let seq = conn.seq;
                if clean {
                    self.put_idle(conn);
                }
                Ok((frames, seq))
            }
            Err(failure) => Err(self.fail(key, failure)),
        }
    }

    fn fail(&self, key: &str, failure: Failure) -> BackendError {
        match failure {
            Failure::Io(e) => {
                self.purge();
                self.unavailable(key, e)
            }
            Failure::Closed => {
                self.purge();
                self.unavailable(key, "connection closed by the server")
            }
            Failure::Timeout => BackendError::TimedOut {
                key: key.to_owned(),
                after: self.response_timeout,
            },
            Failure::Proto(e) => {
                tracing::warn!(addr = %self.addr, error = %e, "bad reply from memcached; dropping the connection");
                BackendError::protocol(key, format!("{}: {e}", self.addr))
            }
        }
    }

    fn unavailable(&self, key: &str, reason: impl std::fmt::Display) -> BackendError {
        BackendError::unavailable(key, format!("memcached {}: {reason}", self.addr))
    }

    async fn connect(&self, key: &str) -> BackendResult<Conn> {
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.addr.as_str()),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                self.purge();
                return Err(self.unavailable(key, format!("connect failed: {e}")));
            }
            Err(_) => {
                return Err(self.unavailable(
                    key,
                    format!("connect timed out after {:?}", self.connect_timeout),
                ));
            }
        };
        stream
            .set_nodelay(true)
            .map_err(|e| self.unavailable(key, format!("TCP_NODELAY: {e}")))?;
        // Numbered only now that it is established: a connection numbered
        // at most `n` was open before connection `n` sent anything.
        let peer = stream.peer_addr().ok();
        let seq = {
            let mut seqs = self.seqs.lock();
            seqs.last = seqs.last.saturating_add(1);
            if peer.is_none() || seqs.peer != peer {
                seqs.peer = peer;
                seqs.peer_changed_at = seqs.last;
            }
            seqs.last
        };
        tracing::debug!(addr = %self.addr, seq, "opened memcached connection");
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            seq,
        })
    }

    async fn exchange<F: Frame>(
        &self,
        conn: &mut Conn,
        request: &[u8],
        until: Until,
        max_value_len: usize,
    ) -> Result<(Vec<F>, bool), Failure> {
        let work = async {
            conn.buf.clear();
            let Conn { stream, buf, .. } = &mut *conn;
            let (mut reader, mut writer) = stream.split();
            // Write and read at the same time: a big pipelined batch whose
            // replies fill the socket buffers must not deadlock with the
            // server (it stops reading while it cannot write).
            let write = async { writer.write_all(request).await.map_err(Failure::Io) };
            let read = async {
                let mut frames = Vec::new();
                let mut clean = true;
                loop {
                    // Take every complete frame already buffered.
                    while let Some((frame, used)) =
                        F::parse(buf, max_value_len).map_err(Failure::Proto)?
                    {
                        buf.advance(used);
                        clean &= frame.clean();
                        frames.push(frame);
                        let Until::Count(n) = until;
                        if frames.len() >= n {
                            // Anything left over was not asked for.
                            clean &= buf.is_empty();
                            return Ok((frames, clean));
                        }
                    }
                    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                        buf.reserve(READ_CHUNK);
                    }
                    let n = reader.read_buf(buf).await.map_err(Failure::Io)?;
                    if n == 0 {
                        return Err(Failure::Closed);
                    }
                }
            };
            let ((), out) = tokio::try_join!(write, read)?;
            Ok(out)
        };
        let result = match tokio::time::timeout(self.response_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout),
        };
        if conn.buf.capacity() > KEEP_BUFFER {
            conn.buf = BytesMut::with_capacity(16 * 1024);
        }
        result
    }

    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock();
        while let Some(conn) = idle.pop() {
            if conn.looks_alive() {
                return Some(conn);
            }
            tracing::debug!(addr = %self.addr, "dropping a pooled memcached connection the server closed");
        }
        None
    }

    /// An idle live connection numbered at most `session`, with no change
    /// of peer address between its number and `session`.
    fn take_idle_pinned(&self, session: u64) -> Option<Conn> {
        let since = self.seqs.lock().peer_changed_at;
        let mut idle = self.idle.lock();
        while let Some(i) = idle
            .iter()
            .rposition(|c| c.seq <= session && c.seq >= since)
        {
            let conn = idle.swap_remove(i);
            if conn.looks_alive() {
                return Some(conn);
            }
            tracing::debug!(addr = %self.addr, "dropping a pooled memcached connection the server closed");
        }
        None
    }

    /// Connections exist only while a permit is held or in the idle list,
    /// so the list never holds more than `max_connections`.
    fn put_idle(&self, conn: Conn) {
        self.idle.lock().push(conn);
    }

    fn purge(&self) {
        self.idle.lock().clear();
    }
}
