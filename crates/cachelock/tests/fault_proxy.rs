//! The fault proxy itself, checked against a real Redis with raw RESP, so
//! the fault-injection tests stand on a proxy that does what it says.
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::fault_proxy::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn redis_addr() -> SocketAddr {
    let url = common::server_env("CACHELOCK_TEST_REDIS_URL");
    let hostport = url.trim_start_matches("redis://").trim_end_matches('/');
    hostport
        .parse()
        .expect("CACHELOCK_TEST_REDIS_URL is redis://IP:PORT")
}

async fn ping(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    stream.write_all(b"PING\r\n").await?;
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    buf.truncate(n);
    Ok(buf)
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn relays_delays_black_holes_and_cuts() {
    let upstream = redis_addr();
    let proxy = FaultProxy::start(upstream).await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(ping(&mut s).await.unwrap(), b"+PONG\r\n");

    proxy.set_latency(Duration::from_millis(150));
    let t = Instant::now();
    assert_eq!(ping(&mut s).await.unwrap(), b"+PONG\r\n");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "both directions delayed: {:?}",
        t.elapsed()
    );
    proxy.heal();

    proxy.black_hole(true);
    assert!(
        ping(&mut s).await.is_err(),
        "nothing comes back from a black hole"
    );
    proxy.heal();

    // Counted per connection from its start.
    proxy.cut_after_bytes(3);
    let mut s2 = TcpStream::connect(proxy.addr()).await.unwrap();
    let partial = ping(&mut s2).await.unwrap();
    assert_eq!(partial, b"+PO", "cut in the middle of the reply");
    assert_eq!(ping(&mut s2).await.unwrap_or_default(), b"", "then closed");

    let mut s3 = TcpStream::connect(proxy.addr()).await.unwrap();
    proxy.heal();
    assert_eq!(ping(&mut s3).await.unwrap(), b"+PONG\r\n");
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        ping(&mut s3).await.map(|b| b.is_empty()).unwrap_or(true),
        "cut_all closes open connections"
    );
    assert_eq!(proxy.accepted(), 3);
}
