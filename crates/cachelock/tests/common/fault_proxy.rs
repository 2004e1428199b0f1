//! A fault-injecting TCP relay for tests: it sits between cachelock and a
//! real Redis or Memcached on loopback and can add latency, black-hole
//! traffic, cut every connection, or cut connections after a number of
//! server-to-client bytes (in the middle of a response).
//!
//! It listens on 127.0.0.1 only and connects only to the upstream address
//! it is given. Every test that uses it bounds its own duration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Default)]
struct Faults {
    /// Added before each forwarded piece, in microseconds.
    latency_us: AtomicU64,
    /// Bytes are read but not forwarded; new connections are accepted.
    black_hole: AtomicBool,
    /// Cut a connection once this many server-to-client bytes passed it
    /// (0 = never).
    cut_after: AtomicUsize,
    /// Connections accepted so far.
    accepted: AtomicUsize,
}

/// The relay. Dropping it stops accepting and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    faults: Arc<Faults>,
    cut: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut_all();
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts a relay to `upstream` on a free loopback port.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        assert!(
            upstream.ip().is_loopback(),
            "the fault proxy only relays to loopback"
        );
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let faults = Arc::new(Faults::default());
        let (cut, _) = watch::channel(0u64);
        let (f, c) = (faults.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                f.accepted.fetch_add(1, Ordering::SeqCst);
                let (f, cut_rx) = (f.clone(), c.subscribe());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, f, cut_rx).await;
                    }
                });
            }
        });
        FaultProxy {
            addr,
            faults,
            cut,
            task,
        }
    }

    /// The address to point the client at.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds `d` of latency to every forwarded piece, both ways.
    pub fn set_latency(&self, d: Duration) {
        self.faults
            .latency_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// While on, bytes are swallowed in both directions (connections stay open).
    pub fn black_hole(&self, on: bool) {
        self.faults.black_hole.store(on, Ordering::SeqCst);
    }

    /// Cuts connections once `bytes` server-to-client bytes have passed each
    /// (`0`: never).
    pub fn cut_after_bytes(&self, bytes: usize) {
        self.faults.cut_after.store(bytes, Ordering::SeqCst);
    }

    /// Closes every open connection now.
    pub fn cut_all(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// How many connections were accepted so far.
    pub fn accepted(&self) -> usize {
        self.faults.accepted.load(Ordering::SeqCst)
    }

    /// Back to a plain relay.
    pub fn heal(&self) {
        self.set_latency(Duration::ZERO);
        self.black_hole(false);
        self.cut_after_bytes(0);
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    f: Arc<Faults>,
    mut cut: watch::Receiver<u64>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = {
        let f = f.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = cr.read(&mut buf).await.ok().filter(|n| *n > 0)?;
                pause(&f).await;
                if !f.black_hole.load(Ordering::SeqCst) {
                    sw.write_all(&buf[..n]).await.ok()?;
                }
            }
            #[allow(unreachable_code)]
            Some(())
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut passed = 0usize;
        loop {
            let n = sr.read(&mut buf).await.ok().filter(|n| *n > 0)?;
            pause(&f).await;
            if f.black_hole.load(Ordering::SeqCst) {
                continue;
            }
            let limit = f.cut_after.load(Ordering::SeqCst);
            if limit > 0 && passed + n >= limit {
                let keep = limit.saturating_sub(passed);
                cw.write_all(&buf[..keep]).await.ok()?;
                return None; // cut mid-response
            }
            passed += n;
            cw.write_all(&buf[..n]).await.ok()?;
        }
        #[allow(unreachable_code)]
        Some(())
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut.changed() => {}
    }
}

async fn pause(f: &Faults) {
    let us = f.latency_us.load(Ordering::SeqCst);
    if us > 0 {
        tokio::time::sleep(Duration::from_micros(us)).await;
    }
}
