//! The Memcached backend against real servers: the conformance suite and
//! the lock cases on one server and on three, a server that is down, a
//! server that restarts (a private memcached started by the test), timeouts
//! and broken connections (through the fault proxy), and bad replies (a
//! scripted fake server).
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachelock::backend::memcached::{MemcachedBackend, MemcachedOptions};
use cachelock::{Backend, BackendError, SharedBackend};
use common::fault_proxy::FaultProxy;
use common::servers::{PrivateMemcached, closed_port};
use common::unique_key;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const LONG: Duration = Duration::from_secs(60);

/// The test servers' URL list (`memcached://a,b,c`).
fn urls() -> String {
    common::server_env("CACHELOCK_TEST_MEMCACHED_URLS")
}

/// The servers as `host:port`.
fn addrs() -> Vec<String> {
    urls()
        .trim_start_matches("memcached://")
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect()
}

async fn one_server() -> SharedBackend {
    let first = &addrs()[0];
    let b = MemcachedBackend::connect(&format!("memcached://{first}"))
        .await
        .expect("connect to the first test memcached");
    Arc::new(b)
}

async fn three_servers() -> SharedBackend {
    let b = MemcachedBackend::connect(&urls())
        .await
        .expect("connect to the test memcacheds");
    assert_eq!(b.servers().len(), 3, "{b:?}");
    Arc::new(b)
}

mod one {
    use super::common;
    use crate::{conformance_tests, lock_tests};
    conformance_tests!(super::one_server().await, paused = false, #[ignore = "needs the test servers: scripts/test"]);
    lock_tests!(super::one_server().await, paused = false, #[ignore = "needs the test servers: scripts/test"]);
}

mod three {
    use super::common;
    use crate::{conformance_tests, lock_tests};
    conformance_tests!(super::three_servers().await, paused = false, #[ignore = "needs the test servers: scripts/test"]);
    lock_tests!(super::three_servers().await, paused = false, #[ignore = "needs the test servers: scripts/test"]);
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn keys_spread_over_all_three_servers() {
    let addrs = addrs();
    let all = three_servers().await;
    let keys: Vec<String> = (0..90).map(|i| unique_key(&format!("spread{i}"))).collect();
    for k in &keys {
        all.set(k, k.as_bytes(), LONG).await.unwrap();
    }
    // Each key sits on exactly one server, and every server got some.
    let mut total = 0;
    for addr in &addrs {
        let single = MemcachedBackend::connect(addr).await.unwrap();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let found = single
            .get_many(&refs)
            .await
            .unwrap()
            .into_iter()
            .flatten()
            .count();
        assert!(found >= 10, "{addr} holds only {found} of 90 keys");
        total += found;
    }
    assert_eq!(total, keys.len());
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn a_down_server_fails_only_its_keys() {
    let addrs = addrs();
    let dead = format!("127.0.0.1:{}", closed_port());
    let url = format!("memcached://{},{},{dead}", addrs[0], addrs[1]);
    let b = MemcachedBackend::connect_with(
        &url,
        MemcachedOptions::new().connect_timeout(Duration::from_millis(500)),
    )
    .await
    .expect("connect tolerates one server down");
    let (mut ok, mut down) = (Vec::new(), Vec::new());
    for i in 0..60 {
        let k = unique_key(&format!("down{i}"));
        let start = Instant::now();
        match b.set(&k, b"v", LONG).await {
            Ok(()) => ok.push(k),
            Err(e) => {
                assert!(
                    matches!(e, BackendError::Unavailable { .. }),
                    "down server gives Unavailable: {e:?}"
                );
                assert!(e.to_string().contains(&dead), "names the server: {e}");
                assert_eq!(e.key(), k);
                assert!(start.elapsed() < Duration::from_secs(3), "no hang");
                down.push(k);
            }
        }
    }
    assert!(
        !ok.is_empty() && !down.is_empty(),
        "keys on both kinds of server: {} ok, {} down",
        ok.len(),
        down.len()
    );
    for k in &ok {
        assert_eq!(b.get(k).await.unwrap().as_deref(), Some(&b"v"[..]));
    }
    for k in &down {
        assert!(b.get(k).await.unwrap_err().is_unavailable());
        assert!(b.add(k, b"v", LONG).await.unwrap_err().is_unavailable());
    }
    let live: Vec<&str> = ok.iter().map(String::as_str).collect();
    assert!(b.get_many(&live).await.unwrap().iter().all(Option::is_some));
}

#[tokio::test]
async fn connect_refuses_bad_urls_and_all_servers_down() {
    for bad in ["", "redis://127.0.0.1:1", "127.0.0.1:notaport", "a:1,,b:2"] {
        assert!(MemcachedBackend::connect(bad).await.is_err(), "{bad:?}");
    }
    let url = format!("127.0.0.1:{},127.0.0.1:{}", closed_port(), closed_port());
    let err = MemcachedBackend::connect(&url).await.unwrap_err();
    // About no key: it names the servers (issue 10, item 15).
    assert!(matches!(err, BackendError::Connect { .. }), "{err:?}");
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.key().starts_with("memcached://127.0.0.1:"), "{err:?}");
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn ttls_over_30_days_are_kept() {
    let b = one_server().await;
    let k = unique_key("long-ttl");
    let ttl = Duration::from_secs(31 * 24 * 3600);
    b.set(&k, b"v", ttl).await.unwrap();
    let left = b.ttl(&k).await.unwrap().expect("has a TTL");
    // Memcached converts an absolute time with whole-second clocks, so
    // allow a second or two either way.
    assert!(
        left > ttl - Duration::from_secs(10) && left <= ttl + Duration::from_secs(2),
        "sent as absolute time, read back as {left:?}"
    );
    assert!(b.touch(&k, ttl * 2).await.unwrap());
    let left = b.ttl(&k).await.unwrap().unwrap();
    assert!(left > ttl * 2 - Duration::from_secs(10), "{left:?}");
    // A counter made by incr has no expiry: memcached says -1, we say None.
    let c = unique_key("counter");
    b.incr(&c, 3).await.unwrap();
    assert_eq!(b.ttl(&c).await.unwrap(), None);
    assert!(b.get(&c).await.unwrap().is_some());
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn exactly_max_value_size_with_the_longest_key_stores() {
    let b = one_server().await;
    assert_eq!(
        b.max_value_size(),
        1024 * 1024 - 1024,
        "from stats settings"
    );
    let base = unique_key("max");
    let k = format!("{base}{}", "k".repeat(250 - base.len()));
    assert_eq!(k.len(), 250);
    let v: Vec<u8> = (0..b.max_value_size()).map(|i| (i % 253) as u8).collect();
    b.set(&k, &v, LONG).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&v[..]));
    let items = [(k.as_str(), v.as_slice())];
    b.set_many(&items, LONG).await.unwrap();
    b.delete(&k).await.unwrap();
    let err = b
        .set_many(&[(k.as_str(), &[0u8; 1024 * 1024][..])], LONG)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::ValueTooLarge { .. }), "{err:?}");
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn token_ops_guard_with_cas() {
    // After the token was read, another writer replaces it: the CAS guard
    // stops the delete (seen here as the next read's mismatch).
    let b = three_servers().await;
    let k = unique_key("cas");
    b.set(&k, b"mine", LONG).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let b = b.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                b.delete_if_eq(&k, b"mine", LONG).await.unwrap()
            } else {
                b.extend_if_eq(&k, b"mine", LONG).await.unwrap()
            }
        }));
    }
    let mut deleted = 0;
    for t in tasks {
        if t.await.unwrap() == cachelock::TokenCheck::Matched {
            deleted += 1;
        }
    }
    assert!(deleted >= 1);
    assert_eq!(b.get(&k).await.unwrap(), None, "some delete went through");
}

fn memcached_addr() -> SocketAddr {
    addrs()[0].parse().expect("memcached test URL is IP:PORT")
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn response_timeout_and_broken_connections() {
    let upstream = memcached_addr();
    let proxy = FaultProxy::start(upstream).await;
    let b = MemcachedBackend::connect_with(
        &proxy.addr().to_string(),
        MemcachedOptions::new()
            .connect_timeout(Duration::from_millis(500))
            .response_timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let k = unique_key("proxy");
    b.set(&k, b"v", LONG).await.unwrap();

    proxy.black_hole(true);
    let start = Instant::now();
    let err = b.get(&k).await.unwrap_err();
    assert!(matches!(err, BackendError::TimedOut { .. }), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    proxy.heal();
    // The timed-out connection was dropped; a fresh one works.
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"v"[..]));

    // Cut in the middle of a large reply.
    let big = unique_key("proxy-big");
    b.set(&big, &vec![1u8; 200_000], LONG).await.unwrap();
    proxy.cut_after_bytes(1000);
    proxy.cut_all();
    let err = b.get(&big).await.unwrap_err();
    assert!(err.is_unavailable() && !err.is_timeout(), "{err:?}");
    proxy.heal();
    assert_eq!(b.get(&big).await.unwrap().map(|v| v.len()), Some(200_000));

    // Every pooled connection cut while idle: the next write still works.
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.set(&k, b"w", LONG).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"w"[..]));
}

/// A fake memcached: answers `stats settings`, then `reply` to any command.
async fn fake_server(reply: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake server");
    let addr = listener.local_addr().expect("fake server address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                let mut line = String::new();
                while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                    if line.starts_with("stats") {
                        w.write_all(b"STAT item_size_max 1048576\r\nEND\r\n")
                            .await
                            .expect("fake server write");
                    } else if line.starts_with("ms ") {
                        let len: usize = line
                            .split(' ')
                            .nth(2)
                            .expect("ms length")
                            .parse()
                            .expect("ms length");
                        let mut data = vec![0u8; len + 2];
                        r.read_exact(&mut data).await.expect("fake server read");
                        w.write_all(reply).await.expect("fake server write");
                    } else {
                        w.write_all(reply).await.expect("fake server write");
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn bad_replies_are_typed_errors() {
    let garbage = fake_server(b"HELLO THERE\r\n").await;
    let b = MemcachedBackend::connect(&garbage.to_string())
        .await
        .unwrap();
    let err = b.get("k").await.unwrap_err();
    assert!(matches!(err, BackendError::Protocol { .. }), "{err:?}");
    assert_eq!(err.key(), "k");

    let too_large = fake_server(b"SERVER_ERROR object too large for cache\r\n").await;
    let b = MemcachedBackend::connect(&too_large.to_string())
        .await
        .unwrap();
    let err = b.set("k", b"small", LONG).await.unwrap_err();
    assert!(matches!(err, BackendError::ValueTooLarge { .. }), "{err:?}");

    let wrong = fake_server(b"NS\r\n").await;
    let b = MemcachedBackend::connect(&wrong.to_string()).await.unwrap();
    let err = b.get("k").await.unwrap_err();
    assert!(matches!(err, BackendError::Protocol { .. }), "{err:?}");

    let huge = fake_server(b"VA 99999999999999\r\n").await;
    let b = MemcachedBackend::connect(&huge.to_string()).await.unwrap();
    let err = b.get("k").await.unwrap_err();
    assert!(matches!(err, BackendError::Protocol { .. }), "{err:?}");
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn server_restart_op_fails_then_recovers() {
    let mut server = PrivateMemcached::start(closed_port());
    let url = format!("memcached://127.0.0.1:{}", server.port);
    let b = MemcachedBackend::connect_with(
        &url,
        MemcachedOptions::new().connect_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    let k = unique_key("restart");
    b.set(&k, b"before", LONG).await.unwrap();
    assert!(b.get(&k).await.unwrap().is_some());

    server.stop();
    let start = Instant::now();
    let err = b.get(&k).await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable { .. }), "{err:?}");
    let err = b.set(&k, b"x", LONG).await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(2), "no hang");

    let _server = PrivateMemcached::start(server.port);
    assert_eq!(
        b.get(&k).await.unwrap(),
        None,
        "a restarted memcached is empty"
    );
    b.set(&k, b"after", LONG).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"after"[..]));
    assert!(b.add(&unique_key("restart-add"), b"t", LONG).await.unwrap());
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn server_restart_between_ops_is_not_noticed() {
    let mut server = PrivateMemcached::start(closed_port());
    let url = format!("127.0.0.1:{}", server.port);
    let b = MemcachedBackend::connect(&url).await.unwrap();
    let k = unique_key("restart2");
    b.set(&k, b"before", LONG).await.unwrap();
    // The pooled connection dies with the server; nothing is sent meanwhile.
    server.stop();
    let _server = PrivateMemcached::start(server.port);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Writes are not retried, so this shows the dead idle connection was
    // noticed and dropped before use.
    assert!(b.add(&k, b"after", LONG).await.unwrap());
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"after"[..]));
}

/// The item's client flags and value, read with a raw `mg KEY f v`.
#[allow(clippy::unwrap_used)]
async fn raw_flags(addr: &str, key: &str) -> Option<(u32, Vec<u8>)> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("mg {key} f v\r\n").as_bytes())
        .await
        .unwrap();
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    let mut words = line.split_whitespace();
    match words.next() {
        Some("EN") => return None,
        Some("VA") => {}
        other => panic!("unexpected reply {other:?} in {line:?}"),
    }
    let len: usize = words.next().unwrap().parse().unwrap();
    let flags = words
        .find_map(|w| w.strip_prefix('f'))
        .map_or(0, |f| f.parse().unwrap());
    let mut value = vec![0; len + 2];
    reader.read_exact(&mut value).await.unwrap();
    value.truncate(len);
    Some((flags, value))
}

/// `Compat::Django` on Memcached: the token is stored as text with client
/// flags 16 (how Django's `PyMemcacheCache` stores a `str`), and a renewal,
/// which stores the value again, keeps those flags (else Django would read
/// the lock back as `bytes`). A native lock keeps flags 0.
#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
#[allow(clippy::unwrap_used)]
async fn django_compat_lock_values_are_text_with_flags_16() {
    use cachelock::{CacheLock, Compat, KeyBuilder, LockOptions};

    let addr = addrs()[0].clone();
    let b = one_server().await;
    let key = KeyBuilder::django("", 1).build(unique_key("django-flags"));
    let opts = LockOptions::default().lease(Duration::from_secs(30));
    let lock = CacheLock::new(b.clone(), key.clone(), opts.clone().compat(Compat::Django)).unwrap();
    let mut guard = lock.try_acquire().await.unwrap();
    let want = Some((16, guard.token().as_bytes().to_vec()));
    assert_eq!(raw_flags(&addr, &key).await, want);
    guard.extend(Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(raw_flags(&addr, &key).await, want, "after a renewal");
    assert_eq!(
        guard.release().await.unwrap(),
        cachelock::Released::Released
    );
    assert_eq!(raw_flags(&addr, &key).await, None);

    let native = CacheLock::new(b.clone(), key.clone(), opts).unwrap();
    let mut guard = native.try_acquire().await.unwrap();
    guard.extend(None).await.unwrap();
    // cachelock's own format: flags 0, the token and who holds it.
    let (flags, value) = raw_flags(&addr, &key).await.unwrap();
    assert_eq!(flags, 0);
    assert_eq!(cachelock::Holder::parse(&value).token, guard.token());
    assert_eq!(
        guard.release().await.unwrap(),
        cachelock::Released::Released
    );
}

/// Waits until the backend answers again (after a restart).
async fn answers(b: &SharedBackend) {
    let start = Instant::now();
    while b.get("probe").await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `flush_all` sent to one server.
async fn flush_all(port: u16) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to memcached");
    s.write_all(b"flush_all\r\n").await.expect("send flush_all");
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .await
        .expect("read the reply");
    assert_eq!(line, "OK\r\n");
}

/// 8 tasks × 200 grants per phase; between phases the counter is lost to a
/// `flush_all` and then to a restart. The fences rise in grant order
/// throughout: a lost counter restarts from the clock floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the test servers: scripts/test"]
async fn fences_rise_across_flush_all_and_restart() {
    let port = closed_port();
    let mut server = PrivateMemcached::start(port);
    let b: SharedBackend = Arc::new(
        MemcachedBackend::connect(&format!("memcached://127.0.0.1:{port}"))
            .await
            .unwrap(),
    );
    let k = unique_key("fence-resets");
    let mut fences = common::lock_cases::fences_in_grant_order(b.clone(), &k, 8, 200).await;
    flush_all(port).await;
    assert_eq!(b.fence(&k).await.unwrap(), None, "the counter is gone");
    fences.extend(common::lock_cases::fences_in_grant_order(b.clone(), &k, 8, 200).await);
    server.restart();
    answers(&b).await;
    assert_eq!(b.fence(&k).await.unwrap(), None, "the counter is gone");
    fences.extend(common::lock_cases::fences_in_grant_order(b.clone(), &k, 8, 200).await);
    assert_eq!(fences.len(), 600);
    common::lock_cases::assert_strictly_increasing(&fences);
}

/// One raw meta command to the memcached on `port`; its reply line.
async fn raw(port: u16, command: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to memcached");
    s.write_all(command).await.expect("send");
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .await
        .expect("read the reply");
    line
}

/// The CAS of `key` on the memcached on `port` (`None`: absent).
async fn raw_cas(port: u16, key: &str) -> Option<u64> {
    let line = raw(port, format!("mg {key} c\r\n").as_bytes()).await;
    if line == "EN\r\n" {
        return None;
    }
    let cas = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix('c'))
        .unwrap_or_else(|| panic!("no CAS in {line:?}"));
    Some(cas.parse().expect("a numeric CAS"))
}

/// Stores a filler item on `port` and returns the CAS it got.
async fn raw_filler(port: u16) -> u64 {
    let line = raw(port, b"ms cas-filler 1 T0 c\r\nx\r\n").await;
    line.trim_end()
        .strip_prefix("HD c")
        .unwrap_or_else(|| panic!("unexpected reply {line:?}"))
        .parse()
        .expect("a numeric CAS")
}

/// Issue 11, one-trip release and renewal: A holds a lock, the server
/// restarts (counting CAS values from 1 again), B takes the lock and the
/// stores in between are arranged so that B's lock gets exactly A's CAS.
/// A's release and A's renewal must still not touch B's lock: the CAS is
/// only sent over a connection open since A's add, and those died with the
/// old server. Both with B on A's backend (fresh connections in A's pool)
/// and on a backend of its own (A's dead connections still pooled).
#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn a_cas_from_before_a_restart_never_touches_the_next_holder() {
    use cachelock::{CacheLock, Error, LockOptions, Released};
    for (extend, shared) in [(false, true), (false, false), (true, true), (true, false)] {
        let port = closed_port();
        let mut server = PrivateMemcached::start(port);
        let url = format!("memcached://127.0.0.1:{port}");
        let a_backend: SharedBackend = Arc::new(MemcachedBackend::connect(&url).await.unwrap());
        let b_backend: SharedBackend = if shared {
            a_backend.clone()
        } else {
            Arc::new(MemcachedBackend::connect(&url).await.unwrap())
        };
        let key = unique_key("cas-restart");
        let opts = LockOptions::new().lease(Duration::from_secs(30));
        // A few stores first, so that A's CAS is not simply 1.
        for _ in 0..5 {
            raw_filler(port).await;
        }
        let a = CacheLock::new(a_backend.clone(), key.as_str(), opts.clone()).unwrap();
        let mut guard_a = a.acquire().await.unwrap();
        let cas_a = raw_cas(port, &key).await.expect("A's lock is stored");

        server.restart();
        answers(&b_backend).await;
        // Bring the new process's CAS counter to just below A's CAS: B's
        // add (the first store after) then gets A's CAS.
        let mut last = 0;
        while last + 1 < cas_a {
            last = raw_filler(port).await;
        }
        let b = CacheLock::new(b_backend.clone(), key.as_str(), opts.clone()).unwrap();
        let guard_b = b.acquire().await.unwrap();
        let b_value = b_backend.get(&key).await.unwrap().expect("B's lock");
        assert_eq!(
            raw_cas(port, &key).await,
            Some(cas_a),
            "B's lock carries A's old CAS (the collision this test is about)"
        );

        if extend {
            let err = guard_a.extend(None).await.unwrap_err();
            assert!(matches!(err, Error::LeaseExpired { .. }), "{err:?}");
            assert_eq!(guard_a.release().await.unwrap(), Released::Lost);
        } else {
            assert_eq!(guard_a.release().await.unwrap(), Released::Lost);
        }
        assert_eq!(
            b_backend.get(&key).await.unwrap().as_deref(),
            Some(b_value.as_ref()),
            "B's lock is untouched (extend: {extend}, shared backend: {shared})"
        );
        assert_eq!(raw_cas(port, &key).await, Some(cas_a));
        assert_eq!(guard_b.release().await.unwrap(), Released::Released);
        assert_eq!(b_backend.get(&key).await.unwrap(), None);
    }
}

/// Issue 11: with a usable CAS the release is one round trip (`md`), and
/// the renewal one (`ms C<cas>`), counted by the server's own `cmd_*`
/// statistics.
#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn release_and_renewal_are_one_round_trip() {
    use cachelock::{CacheLock, LockOptions, Released};
    let port = closed_port();
    let _server = PrivateMemcached::start(port);
    let url = format!("memcached://127.0.0.1:{port}");
    let backend: SharedBackend = Arc::new(MemcachedBackend::connect(&url).await.unwrap());
    let key = unique_key("one-trip");
    let lock = CacheLock::new(backend, key.as_str(), LockOptions::new()).unwrap();
    let mut guard = lock.acquire().await.unwrap();
    let before = raw_stats(port).await;
    guard.extend(None).await.unwrap();
    assert_eq!(guard.release().await.unwrap(), Released::Released);
    let after = raw_stats(port).await;
    let delta = |name: &str| after[name] - before[name];
    assert_eq!(delta("cmd_get"), 0, "no read: {before:?} -> {after:?}");
    assert_eq!(delta("cmd_set"), 1, "one ms (the renewal)");
    assert_eq!(delta("delete_hits"), 1, "one md (the release)");
}

/// The numeric `stats` of the memcached on `port`.
async fn raw_stats(port: u16) -> std::collections::HashMap<String, u64> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to memcached");
    s.write_all(b"stats\r\n").await.expect("send");
    let mut lines = BufReader::new(s).lines();
    let mut stats = std::collections::HashMap::new();
    while let Some(line) = lines.next_line().await.expect("read stats") {
        if line == "END" {
            break;
        }
        let mut parts = line.split_whitespace().skip(1);
        if let (Some(name), Some(value)) = (parts.next(), parts.next())
            && let Ok(value) = value.parse()
        {
            stats.insert(name.to_owned(), value);
        }
    }
    stats
}
