//! A fault-injecting TCP relay for the CLI tests (the idea of the library's
//! `tests/common/fault_proxy.rs`, on plain threads because these tests are
//! synchronous): it sits between `cachelock` and a real server on loopback
//! and can black-hole traffic (a partition) or delay the requests that
//! mention one key (a slow round trip for that key only, so connecting stays
//! fast).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Faults {
    stop: AtomicBool,
    /// Bytes are read but not forwarded, both ways.
    black_hole: AtomicBool,
    /// Client-to-server pieces containing these bytes wait this long.
    delay: Mutex<Option<(Vec<u8>, Duration)>>,
    /// How many pieces contained the delayed bytes.
    seen: AtomicUsize,
    /// Open connections, to cut them when the proxy is dropped.
    conns: Mutex<Vec<TcpStream>>,
}

/// The relay; dropping it stops it and closes every connection.
pub struct Proxy {
    addr: SocketAddr,
    faults: Arc<Faults>,
}

impl Proxy {
    /// Starts a relay to `upstream` (loopback only) on a free port.
    pub fn start(upstream: SocketAddr) -> Self {
        assert!(upstream.ip().is_loopback(), "relays to loopback only");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        std::thread::spawn(move || {
            while !f.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let Ok(server) = TcpStream::connect(upstream) {
                            relay(client, server, &f);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { addr, faults }
    }

    /// The address to point `cachelock` at.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// While on, nothing gets through (connections stay open).
    pub fn black_hole(&self, on: bool) {
        self.faults.black_hole.store(on, Ordering::SeqCst);
    }

    /// Delays every client-to-server piece that contains `marker` by `d`.
    pub fn delay_containing(&self, marker: &[u8], d: Duration) {
        *self.faults.delay.lock().unwrap() = Some((marker.to_vec(), d));
    }

    /// How many pieces contained the delayed marker so far.
    pub fn seen(&self) -> usize {
        self.faults.seen.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.faults.stop.store(true, Ordering::SeqCst);
        for c in self.faults.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn relay(client: TcpStream, server: TcpStream, f: &Arc<Faults>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    {
        let mut conns = f.conns.lock().unwrap();
        for s in [&client, &server] {
            if let Ok(c) = s.try_clone() {
                conns.push(c);
            }
        }
    }
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = f.clone();
    std::thread::spawn(move || pump(client, server, &up, true));
    let down = f.clone();
    std::thread::spawn(move || pump(server2, client2, &down, false));
}

fn pump(mut from: TcpStream, mut to: TcpStream, f: &Faults, upward: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let piece = &buf[..n];
        if upward {
            let delay = f.delay.lock().unwrap().clone();
            if let Some((marker, d)) = delay
                && piece.windows(marker.len()).any(|w| w == marker)
            {
                f.seen.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(d);
            }
        }
        if f.black_hole.load(Ordering::SeqCst) || f.stop.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(piece).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
