//! Issue 10, item 10: a wrong or hostile server must not make the client
//! allocate without bound. Each fake server here (a tokio listener in the
//! test) answers with a reply far longer than the request can legitimately
//! get back; the client must refuse it as a protocol error, drop the
//! connection, and keep its peak memory (VmHWM) low.
#![cfg(all(feature = "memcached", feature = "redis"))]
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cachelock::{Backend, MemcachedBackend, MemcachedOptions, RedisBackend, RedisOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The process's peak resident set size, in bytes (Linux).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb * 1024
}

/// A fake memcached: answers `stats settings` like a real one, then answers
/// every other request with `header` followed by an endless stream of
/// filler bytes (what a real server's value would be).
async fn fake_memcached(header: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let Ok(n) = sock.read(&mut buf).await else {
                    return;
                };
                if buf[..n].starts_with(b"stats") {
                    let _ = sock
                        .write_all(b"STAT item_size_max 1048576\r\nEND\r\n")
                        .await;
                    return;
                }
                if sock.write_all(header).await.is_err() {
                    return;
                }
                let filler = vec![b'x'; 64 * 1024];
                // Up to 2 GB, unless the client hangs up first.
                for _ in 0..32_768 {
                    if sock.write_all(&filler).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("memcached://{addr}")
}

async fn backend(url: &str) -> MemcachedBackend {
    MemcachedBackend::connect_with(
        url,
        MemcachedOptions::new().response_timeout(Duration::from_secs(10)),
    )
    .await
    .unwrap()
}

const LIMIT: u64 = 100 * 1024 * 1024;

#[tokio::test]
async fn memcached_value_announced_to_a_lock_add_is_refused() {
    let url = fake_memcached(b"VA 1000000000\r\n").await;
    let b = backend(&url).await;
    let before = peak_rss();
    let err = b
        .add("lock", b"token", Duration::from_secs(30))
        .await
        .unwrap_err();
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < LIMIT, "peak RSS grew by {} MB", grown >> 20);
    assert!(
        matches!(err, cachelock::BackendError::Protocol { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn memcached_value_over_the_item_limit_is_refused_on_get() {
    let url = fake_memcached(b"VA 1000000000\r\n").await;
    let b = backend(&url).await;
    let before = peak_rss();
    let err = b.get("k").await.unwrap_err();
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < LIMIT, "peak RSS grew by {} MB", grown >> 20);
    assert!(
        matches!(err, cachelock::BackendError::Protocol { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn memcached_endless_line_is_refused() {
    let url = fake_memcached(b"HD ").await;
    let b = backend(&url).await;
    let before = peak_rss();
    let err = b.delete("k").await.unwrap_err();
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < LIMIT, "peak RSS grew by {} MB", grown >> 20);
    assert!(
        matches!(err, cachelock::BackendError::Protocol { .. }),
        "{err:?}"
    );
}

/// A fake Redis that speaks just enough RESP2 to be connected to (it
/// refuses `HELLO`, so the client falls back to RESP2, and knows no native
/// compare-and-delete), also as a one-node Cluster (`CLUSTER SLOTS` names
/// itself for every slot, `PING` answers), then answers every other command
/// with `header` followed by an endless stream of filler bytes.
async fn fake_redis(header: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let slots: &'static [u8] = format!(
        "*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:{}\r\n",
        addr.port()
    )
    .into_bytes()
    .leak();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let Ok(n) = sock.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    // One answer per command (each starts with `*N`; its
                    // name is the first bulk string after it).
                    let request = String::from_utf8_lossy(&buf[..n]).to_ascii_uppercase();
                    let mut answers = Vec::new();
                    let mut hostile = false;
                    for command in request.split('*').skip(1) {
                        let name = command.split("\r\n").nth(2).unwrap_or_default();
                        match name {
                            "HELLO" => {
                                answers.extend_from_slice(b"-ERR unknown command 'HELLO'\r\n")
                            }
                            "COMMAND" => answers.extend_from_slice(b"*2\r\n$-1\r\n$-1\r\n"),
                            "CLIENT" | "SELECT" | "AUTH" | "READONLY" => {
                                answers.extend_from_slice(b"+OK\r\n")
                            }
                            "PING" => answers.extend_from_slice(b"+PONG\r\n"),
                            "CLUSTER" => answers.extend_from_slice(slots),
                            _ => hostile = true,
                        }
                    }
                    if sock.write_all(&answers).await.is_err() {
                        return;
                    }
                    if hostile {
                        break;
                    }
                }
                if sock.write_all(header).await.is_err() {
                    return;
                }
                let filler = vec![b'x'; 64 * 1024];
                for _ in 0..32_768 {
                    if sock.write_all(&filler).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("redis://{addr}")
}

async fn redis_backend(url: &str) -> RedisBackend {
    RedisBackend::connect_with(
        url,
        RedisOptions::new().response_timeout(Duration::from_secs(10)),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn redis_bulk_string_over_the_value_limit_is_refused() {
    let url = fake_redis(b"$2000000000\r\n").await;
    let b = redis_backend(&url).await;
    let before = peak_rss();
    let err = b.get("k").await.unwrap_err();
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < LIMIT, "peak RSS grew by {} MB", grown >> 20);
    assert!(
        matches!(err, cachelock::BackendError::Protocol { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn redis_endless_status_line_is_refused() {
    let url = fake_redis(b"+").await;
    let b = redis_backend(&url).await;
    let before = peak_rss();
    let err = b
        .add("lock", b"token", Duration::from_secs(30))
        .await
        .unwrap_err();
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < LIMIT, "peak RSS grew by {} MB", grown >> 20);
    assert!(
        matches!(err, cachelock::BackendError::Protocol { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn redis_huge_array_is_refused() {
    let url = fake_redis(b"*2000000000\r\n").await;
    let b = redis_backend(&url).await;
    let before = peak_rss();
    let err = b.get_many(&["a", "b"]).await.unwrap_err();
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < LIMIT, "peak RSS grew by {} MB", grown >> 20);
    assert!(
        matches!(err, cachelock::BackendError::Protocol { .. }),
        "{err:?}"
    );
}

/// After a refused reply the connection is replaced: a later operation on
/// the same backend gets a fresh connection (here: the same hostile reply,
/// refused again, not a stuck connection).
#[tokio::test]
async fn redis_connection_is_replaced_after_a_refused_reply() {
    let url = fake_redis(b"$2000000000\r\n").await;
    let b = redis_backend(&url).await;
    for _ in 0..3 {
        let err = b.get("k").await.unwrap_err();
        assert!(
            matches!(err, cachelock::BackendError::Protocol { .. }),
            "{err:?}"
        );
    }
}

/// The same through a Redis Cluster connection: every node connection the
/// `redis` crate's Cluster client opens reads through the same bound.
#[tokio::test]
async fn redis_cluster_bulk_string_over_the_value_limit_is_refused() {
    let url = fake_redis(b"$2000000000\r\n").await;
    let b = RedisBackend::connect_cluster_with(
        &[url.as_str()],
        RedisOptions::new().response_timeout(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert!(b.is_cluster());
    let before = peak_rss();
    let err = b.get("k").await.unwrap_err();
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < LIMIT, "peak RSS grew by {} MB", grown >> 20);
    assert!(
        matches!(err, cachelock::BackendError::Protocol { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn redis_cluster_endless_status_line_is_refused() {
    let url = fake_redis(b"+").await;
    let b = RedisBackend::connect_cluster_with(
        &[url.as_str()],
        RedisOptions::new().response_timeout(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    let before = peak_rss();
    let err = b
        .add("lock", b"token", Duration::from_secs(30))
        .await
        .unwrap_err();
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < LIMIT, "peak RSS grew by {} MB", grown >> 20);
    assert!(
        matches!(err, cachelock::BackendError::Protocol { .. }),
        "{err:?}"
    );
}
