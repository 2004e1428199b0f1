//! The Redis backend against real servers: the conformance suite on the
//! shared standalone Redis and the shared 3-master Cluster, URL handling,
//! servers that are down, a server restart, authentication, databases,
//! Unix sockets and timeouts (on private servers this test starts and kills).
// clippy.toml allows unwrap in `#[test]` functions only; these helpers are test code too.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "redis")]
mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachelock::backend::redis::check_url;
use cachelock::{
    Backend, BackendError, LockAdd, Queued, RedisBackend, RedisOptions, SharedBackend, TokenCheck,
    ValueFormat,
};
use common::servers::{PrivateRedis, closed_port};

const LONG: Duration = Duration::from_secs(60);

/// The shared standalone Redis.
async fn standalone() -> SharedBackend {
    let url = common::server_env("CACHELOCK_TEST_REDIS_URL");
    let backend = RedisBackend::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    assert!(!backend.is_cluster());
    Arc::new(backend)
}

/// The shared Cluster.
async fn cluster() -> SharedBackend {
    let urls = common::server_env("CACHELOCK_TEST_REDIS_CLUSTER_URLS");
    let urls: Vec<&str> = urls.split(',').map(str::trim).collect();
    let backend = RedisBackend::connect_cluster(&urls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the cluster {urls:?}: {e}"));
    assert!(backend.is_cluster());
    Arc::new(backend)
}

mod standalone {
    use super::common;
    use crate::conformance_tests;
    conformance_tests!(crate::standalone().await, paused = false, #[ignore = "needs the test servers: scripts/test"]);
}

mod cluster {
    use super::common;
    use crate::conformance_tests;
    conformance_tests!(crate::cluster().await, paused = false, #[ignore = "needs the test servers: scripts/test"]);
}

/// CacheLock's cases (those that run in real time) on the standalone Redis.
mod standalone_lock {
    use super::common;
    use crate::lock_tests;
    lock_tests!(crate::standalone().await, paused = false, #[ignore = "needs the test servers: scripts/test"]);
}

/// CacheLock's cases on the Cluster.
mod cluster_lock {
    use super::common;
    use crate::lock_tests;
    lock_tests!(crate::cluster().await, paused = false, #[ignore = "needs the test servers: scripts/test"]);
}

// ---------------------------------------------------------------------------
// URLs

#[test]
fn url_table() {
    let accepted = [
        "redis://127.0.0.1:6379",
        "redis://127.0.0.1",
        "redis://localhost:6379/0",
        "redis://cache.example.com:7000/15",
        "redis://alice:s3cret@127.0.0.1:6379/2",
        "redis://:s3cret@127.0.0.1:6379",
        "redis://%61lice:p%40ss@127.0.0.1",
        "redis://[::1]:6379",
        "rediss://cache.example.com:6380",
        "rediss://alice:s3cret@cache.example.com/1",
        "redis+unix:///run/redis/redis.sock",
        "redis+unix:///run/redis/redis.sock?db=3&pass=s3cret",
        "unix:///run/redis/redis.sock",
    ];
    for url in accepted {
        if let Err(e) = check_url(url) {
            panic!("{url:?} was refused: {e}");
        }
    }

    // (url, a part of the message that says what is wrong)
    let refused = [
        ("", "not a URL"),
        ("127.0.0.1:6379", "not a URL"),
        ("http://127.0.0.1:6379", "unsupported scheme \"http\""),
        (
            "memcached://127.0.0.1:11211",
            "unsupported scheme \"memcached\"",
        ),
        ("redis://127.0.0.1:6379/abc", "Invalid database number"),
        ("redis://127.0.0.1:6379/-1", "database number"),
        ("redis://127.0.0.1:99999", "does not parse as a URL"),
        ("redis://", "host"),
        ("redis://0.0.0.0:6379", "wildcard"),
        (
            "rediss://127.0.0.1/#bogus",
            "fragments (#...) are not supported",
        ),
        (
            "redis://127.0.0.1/?protocol=9",
            "Invalid protocol version: 9",
        ),
        ("rediss://127.0.0.1/#insecure", "#insecure"),
        ("redis://u:p@ss@127.0.0.1:6379:1", "does not parse"),
        (
            "redis+unix:///run/redis.sock?db=x",
            "Invalid database number",
        ),
    ];
    for (url, why) in refused {
        let err = check_url(url).expect_err(url);
        assert!(
            matches!(err, BackendError::InvalidUrl { .. }),
            "{url:?}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("invalid cache backend URL"), "{url:?}: {msg}");
        assert!(msg.contains(why), "{url:?}: {msg:?} should say {why:?}");
        assert!(!msg.contains("InvalidClientConfig"), "{msg}");
    }
}

#[test]
fn url_errors_never_show_passwords() {
    for url in [
        "redis://alice:hunter2@127.0.0.1:6379/notadb",
        "redis://:hunter2@127.0.0.1:99999",
        "redis+unix:///run/redis.sock?pass=hunter2&db=x",
    ] {
        let msg = check_url(url).expect_err(url).to_string();
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(msg.contains("***"), "{msg}");
    }
}

#[tokio::test]
async fn connect_refuses_bad_urls_and_options_without_io() {
    let err = RedisBackend::connect("http://127.0.0.1:1")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unsupported scheme"), "{err}");
    // A configuration error, not "retry later" (issue 10, item 14).
    let err = RedisBackend::connect_cluster(&[]).await.unwrap_err();
    assert!(matches!(err, BackendError::InvalidConfig { .. }), "{err:?}");
    assert!(!err.is_unavailable(), "{err:?}");
    let err = RedisBackend::connect_cluster(&["redis://127.0.0.1:1", "nonsense"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a URL"), "{err}");
    let err = RedisBackend::connect_with(
        "redis://127.0.0.1:1",
        RedisOptions::new().response_timeout(Duration::ZERO),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("timeouts must be positive"),
        "{err}"
    );
    assert!(matches!(err, BackendError::InvalidConfig { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------
// Servers that are down

#[tokio::test]
async fn down_server_is_unavailable_within_the_connect_timeout() {
    let connect_timeout = Duration::from_secs(1);
    let options = RedisOptions::new().connect_timeout(connect_timeout);
    let url = format!("redis://127.0.0.1:{}", closed_port());

    let start = Instant::now();
    let err = RedisBackend::connect_with(&url, options.clone())
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains(&url), "names the server: {err}");
    assert!(start.elapsed() < connect_timeout, "{:?}", start.elapsed());

    let start = Instant::now();
    let err = RedisBackend::connect_cluster_with(&[&url], options)
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        start.elapsed() < connect_timeout * 2,
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn tls_to_a_plain_server_fails_cleanly() {
    // The TLS handshake against a plain-text Redis fails: an error, not a
    // panic (the rustls crypto provider is installed) and not a hang.
    let url = common::server_env("CACHELOCK_TEST_REDIS_URL");
    let tls_url = url.replacen("redis://", "rediss://", 1);
    let start = Instant::now();
    let err = RedisBackend::connect_with(
        &tls_url,
        RedisOptions::new().connect_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Private servers

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn restart_fails_fast_then_reconnects_by_itself() {
    let mut server = PrivateRedis::start(&[]);
    let connect_timeout = Duration::from_secs(1);
    let b = RedisBackend::connect_with(
        &server.url(),
        RedisOptions::new().connect_timeout(connect_timeout),
    )
    .await
    .unwrap();
    let k = common::unique_key("restart");
    b.set(&k, b"before", LONG).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"before"[..]));
    assert_eq!(
        b.delete_if_eq(&k, b"other", LONG).await.unwrap(),
        TokenCheck::Mismatch
    );

    server.kill();
    for _ in 0..3 {
        let start = Instant::now();
        let err = b.get(&k).await.unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
        assert_eq!(err.key(), k, "the error names the key");
        assert!(
            start.elapsed() < connect_timeout,
            "a down server answers within the connect timeout: {:?}",
            start.elapsed()
        );
    }
    let err = b.add(&k, b"x", LONG).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");

    server.spawn();
    // The very next operation works again; the data did not survive (no
    // persistence), and the scripts are loaded again after NOSCRIPT.
    assert_eq!(b.get(&k).await.unwrap(), None);
    assert!(b.add(&k, b"tok", LONG).await.unwrap());
    assert_eq!(
        b.extend_if_eq(&k, b"tok", LONG).await.unwrap(),
        TokenCheck::Matched
    );
    assert_eq!(
        b.delete_if_eq(&k, b"tok", LONG).await.unwrap(),
        TokenCheck::Matched
    );
    assert_eq!(b.get(&k).await.unwrap(), None);
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn password_database_and_unix_socket() {
    let server = PrivateRedis::start(&["--requirepass", "s3cret"]);
    let port = server.port;

    // No password or a wrong one: the connect fails, saying why, without
    // showing the password.
    let err = RedisBackend::connect(&server.url()).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains("NOAUTH"), "{err}");
    let err = RedisBackend::connect(&format!("redis://:wrong@127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(!err.to_string().contains("wrong@"), "{err}");

    let db2 = RedisBackend::connect(&format!("redis://:s3cret@127.0.0.1:{port}/2"))
        .await
        .unwrap();
    let db0 = RedisBackend::connect(&format!("redis://default:s3cret@127.0.0.1:{port}/0"))
        .await
        .unwrap();
    let k = common::unique_key("db");
    db2.set(&k, b"in db 2", LONG).await.unwrap();
    assert_eq!(db0.get(&k).await.unwrap(), None, "databases are separate");

    let sock = format!(
        "redis+unix://{}?db=2&pass=s3cret",
        server.socket().display()
    );
    let unix = RedisBackend::connect(&sock).await.unwrap();
    assert_eq!(
        unix.get(&k).await.unwrap().as_deref(),
        Some(&b"in db 2"[..])
    );
    assert!(unix.delete(&k).await.unwrap());
    assert_eq!(db2.get(&k).await.unwrap(), None);
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn slow_server_times_out_with_a_typed_error() {
    let server = PrivateRedis::start(&[]);
    let response_timeout = Duration::from_millis(300);
    let b = RedisBackend::connect_with(
        &server.url(),
        RedisOptions::new().response_timeout(response_timeout),
    )
    .await
    .unwrap();
    let k = common::unique_key("slow");
    b.set(&k, b"v", LONG).await.unwrap();

    // Another client pauses the server: our command gets no reply in time.
    let client = redis::Client::open(server.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .exec_async(&mut admin)
        .await
        .unwrap();
    let start = Instant::now();
    let err = b.get(&k).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(err.is_unavailable());
    assert_eq!(err.key(), k);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );

    tokio::time::sleep(Duration::from_millis(1600)).await;
    // After the pause the backend works again (reconnecting if it had to).
    let mut ok = None;
    for _ in 0..2 {
        match b.get(&k).await {
            Ok(v) => {
                ok = Some(v);
                break;
            }
            Err(e) => assert!(e.is_unavailable(), "{e:?}"),
        }
    }
    assert_eq!(ok.flatten().as_deref(), Some(&b"v"[..]));
}

// ---------------------------------------------------------------------------
// Errors and Cluster specifics on the shared servers

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn wrong_type_is_a_protocol_error_naming_the_key() {
    let url = common::server_env("CACHELOCK_TEST_REDIS_URL");
    let b = RedisBackend::connect(&url).await.unwrap();
    let k = common::unique_key("list");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("RPUSH")
        .arg(&k)
        .arg("x")
        .exec_async(&mut raw)
        .await
        .unwrap();
    redis::cmd("PEXPIRE")
        .arg(&k)
        .arg(60_000)
        .exec_async(&mut raw)
        .await
        .unwrap();

    let get = b.get(&k).await.unwrap_err();
    let incr = b.incr(&k, 1).await.unwrap_err();
    let del = b.delete_if_eq(&k, b"tok", LONG).await.unwrap_err();
    let ext = b.extend_if_eq(&k, b"tok", LONG).await.unwrap_err();
    for err in [get, incr, del, ext] {
        assert!(matches!(err, BackendError::Protocol { .. }), "{err:?}");
        assert!(err.to_string().contains("WRONGTYPE"), "{err}");
        assert_eq!(err.key(), k);
    }
    // Read with the lock's add (one script): the add stands, the read fails.
    let lock = common::unique_key("list-lock");
    let r = b
        .add_reading(
            &lock,
            b"tok",
            LONG,
            LockAdd::Fenced(ValueFormat::Raw),
            &[&lock, &k],
        )
        .await
        .unwrap();
    assert!(matches!(r.outcome, Queued::Granted(_)), "the add stands");
    let err = r.values.unwrap_err();
    assert!(matches!(err, BackendError::Protocol { .. }), "{err:?}");
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    assert_eq!(b.get(&lock).await.unwrap().as_deref(), Some(&b"tok"[..]));
    b.delete(&lock).await.unwrap();
    // A counter past i64 is refused by Redis, as a typed error too.
    let c = common::unique_key("counter");
    b.incr(&c, i64::MAX as u64).await.unwrap();
    let err = b.incr(&c, 1).await.unwrap_err();
    assert!(matches!(err, BackendError::Protocol { .. }), "{err:?}");
    b.delete(&c).await.unwrap();
    b.delete(&k).await.unwrap();
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn counters_have_no_ttl_and_zero_ttl_is_not_forever() {
    let b = standalone().await;
    let c = common::unique_key("counter-ttl");
    b.incr(&c, 1).await.unwrap();
    assert_eq!(b.ttl(&c).await.unwrap(), None);
    b.delete(&c).await.unwrap();

    let k = common::unique_key("zero-ttl");
    b.set(&k, b"v", Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(b.get(&k).await.unwrap(), None, "a zero TTL expires at once");
    let t = common::unique_key("ttl");
    b.set(&t, b"v", Duration::from_secs(30)).await.unwrap();
    let left = b.ttl(&t).await.unwrap().unwrap();
    assert!(left <= Duration::from_secs(30) && left > Duration::from_secs(25));
    assert!(b.atomic_token_ops());
    assert_eq!(b.max_value_size(), 512 * 1024 * 1024);
    b.delete(&t).await.unwrap();
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn multi_megabyte_values_and_configured_limit() {
    let url = common::server_env("CACHELOCK_TEST_REDIS_URL");
    let limit = 8 * 1024 * 1024;
    let b = RedisBackend::connect_with(&url, RedisOptions::new().max_value_size(limit))
        .await
        .unwrap();
    assert_eq!(b.max_value_size(), limit);
    let k = common::unique_key("big");
    let v: Vec<u8> = (0..limit).map(|i| (i % 253) as u8).collect();
    b.set(&k, &v, LONG).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&v[..]));
    let over = vec![0u8; limit + 1];
    let err = b.set(&k, &over, LONG).await.unwrap_err();
    assert!(
        matches!(err, BackendError::ValueTooLarge { size, limit: l, .. } if size == limit + 1 && l == limit),
        "{err:?}"
    );
    assert!(matches!(
        b.add(&common::unique_key("big-add"), &over, LONG).await,
        Err(BackendError::ValueTooLarge { .. })
    ));
    assert!(b.delete(&k).await.unwrap());
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn cluster_multi_key_ops_span_slots_in_order() {
    let b = cluster().await;
    // Keys on many slots (and so all three masters), some sharing a hash tag.
    let tag = common::unique_key("tag");
    let keys: Vec<String> = (0..60)
        .map(|i| {
            if i % 3 == 0 {
                format!("{{{tag}}}:{i}")
            } else {
                common::unique_key(&format!("spread{i}"))
            }
        })
        .collect();
    let written: Vec<(&str, Vec<u8>)> = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 != 1)
        .map(|(i, k)| (k.as_str(), format!("value {i}").into_bytes()))
        .collect();
    let items: Vec<(&str, &[u8])> = written.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    b.set_many(&items, LONG).await.unwrap();

    // Read back in reverse order, holes included.
    let refs: Vec<&str> = keys.iter().rev().map(String::as_str).collect();
    let got = b.get_many(&refs).await.unwrap();
    assert_eq!(got.len(), refs.len());
    for (k, g) in refs.iter().zip(&got) {
        let i = keys.iter().position(|x| x == k).unwrap();
        if i % 4 == 1 {
            assert_eq!(*g, None, "{k}");
        } else {
            assert_eq!(g.as_deref(), Some(format!("value {i}").as_bytes()), "{k}");
        }
    }
    for k in &keys {
        b.delete(k).await.unwrap();
    }
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn one_backend_serves_many_tasks_at_once() {
    let b = standalone().await;
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let k = common::unique_key(&format!("par{i}"));
            let v = i.to_be_bytes();
            b.set(&k, &v, LONG).await.unwrap();
            let got = b.get(&k).await.unwrap();
            b.delete(&k).await.unwrap();
            assert_eq!(got.as_deref(), Some(&v[..]));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// Faults between the backend and a real Redis (the shared fault proxy)

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn slow_and_cut_connections_through_a_fault_proxy() {
    let url = common::server_env("CACHELOCK_TEST_REDIS_URL");
    let upstream: std::net::SocketAddr = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("CACHELOCK_TEST_REDIS_URL is redis://IP:PORT");
    let proxy = common::fault_proxy::FaultProxy::start(upstream).await;
    let response_timeout = Duration::from_millis(300);
    let b = RedisBackend::connect_with(
        &format!("redis://{}", proxy.addr()),
        RedisOptions::new()
            .response_timeout(response_timeout)
            .connect_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let (k1, k2) = (common::unique_key("proxy1"), common::unique_key("proxy2"));
    b.set(&k1, b"one", LONG).await.unwrap();
    b.set(&k2, b"two", LONG).await.unwrap();

    // Replies slower than the response timeout: a typed timeout, quickly.
    proxy.set_latency(Duration::from_millis(400));
    let start = Instant::now();
    let err = b.get(&k1).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(err.key(), k1);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );

    // The late reply arrives and is dropped: later replies still go to the
    // right requests.
    proxy.heal();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(b.get(&k2).await.unwrap().as_deref(), Some(&b"two"[..]));
    assert_eq!(b.get(&k1).await.unwrap().as_deref(), Some(&b"one"[..]));

    // A connection cut in the middle of a large reply: unavailable, then the
    // backend reconnects and reads the whole value.
    let big = common::unique_key("proxy-big");
    let v: Vec<u8> = (0..2_000_000).map(|i| (i % 241) as u8).collect();
    b.set(&big, &v, LONG).await.unwrap();
    proxy.cut_after_bytes(100_000);
    proxy.cut_all();
    let mut failures = 0;
    let got = loop {
        match b.get(&big).await {
            Ok(got) => break got,
            Err(e) => {
                assert!(e.is_unavailable(), "{e:?}");
                failures += 1;
                assert!(failures < 5, "the backend does not recover: {e:?}");
                if failures == 2 {
                    proxy.heal();
                }
            }
        }
    };
    assert!(failures >= 1, "the cut connection must show as a failure");
    assert_eq!(got.as_deref(), Some(&v[..]));
    for k in [&k1, &k2, &big] {
        b.delete(k).await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// TLS

/// Makes a throwaway CA and a certificate for localhost/127.0.0.1 signed by
/// it in `dir` with the `openssl` command (as `scripts/services` does).
fn make_test_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run openssl")
            .success();
        assert!(ok, "openssl {args:?} failed");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=cachelock-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("write ext.cnf");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

fn openssl_installed() -> bool {
    Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn check_tls_server(url: &str, ca_pem: Vec<u8>) {
    let b = RedisBackend::connect_with(url, RedisOptions::new().tls_root_certificate(ca_pem))
        .await
        .unwrap_or_else(|e| panic!("TLS connect to {url}: {e}"));
    let k = common::unique_key("tls");
    assert!(b.add(&k, b"tok", LONG).await.unwrap());
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"tok"[..]));
    assert_eq!(
        b.delete_if_eq(&k, b"tok", LONG).await.unwrap(),
        TokenCheck::Matched
    );

    // Without our CA the server's certificate is not trusted: a clean,
    // prompt "unavailable", never a plain-text fallback.
    let start = Instant::now();
    let err = RedisBackend::connect_with(
        url,
        RedisOptions::new().connect_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn tls_with_a_private_ca() {
    assert!(
        openssl_installed(),
        "openssl is not installed: this test needs the test servers; run it through scripts/test"
    );
    let server = PrivateRedis::start_with(|port, dir| {
        make_test_certs(dir);
        let file = |name: &str| dir.join(name).display().to_string();
        vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            file("server.crt"),
            "--tls-key-file".into(),
            file("server.key"),
            "--tls-ca-cert-file".into(),
            file("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
        ]
    });
    let ca = std::fs::read(server.dir.join("ca.crt")).unwrap();
    check_tls_server(&format!("rediss://localhost:{}", server.port), ca.clone()).await;
    check_tls_server(&format!("rediss://127.0.0.1:{}/1", server.port), ca).await;

    // The shared TLS Redis of scripts/services.
    let url = common::server_env("CACHELOCK_TEST_REDIS_TLS_URL");
    let ca_file = common::server_env("CACHELOCK_TEST_REDIS_TLS_CA");
    check_tls_server(&url, std::fs::read(ca_file).unwrap()).await;
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn server_that_never_answers_times_out() {
    let url = common::server_env("CACHELOCK_TEST_REDIS_URL");
    let upstream: std::net::SocketAddr = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("CACHELOCK_TEST_REDIS_URL is redis://IP:PORT");
    let proxy = common::fault_proxy::FaultProxy::start(upstream).await;
    let options = RedisOptions::new()
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500));
    let proxied = format!("redis://{}", proxy.addr());

    // Accepts the TCP connection, then silence: the connect gives up in
    // bounded time (connect timeout, then one response timeout at most).
    proxy.black_hole(true);
    let start = Instant::now();
    let err = RedisBackend::connect_with(&proxied, options.clone())
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );

    // A connected backend whose server goes silent: each operation gives up
    // after the response timeout.
    proxy.heal();
    let b = RedisBackend::connect_with(&proxied, options).await.unwrap();
    proxy.black_hole(true);
    let k = common::unique_key("silent");
    let start = Instant::now();
    let err = b.add(&k, b"tok", LONG).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );

    // The silent connection is given up: once the path works again (new
    // connections through the proxy are healthy while the old one stays
    // dead), the next operations succeed on a new connection.
    proxy.heal();
    b.set(&k, b"after", LONG).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"after"[..]));
    assert!(proxy.accepted() >= 3, "a new connection was opened");
    b.delete(&k).await.unwrap();
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn cluster_connects_through_any_live_node() {
    let urls = common::server_env("CACHELOCK_TEST_REDIS_CLUSTER_URLS");
    let dead = format!("redis://127.0.0.1:{}", closed_port());
    let live = urls.split(',').next().unwrap().trim().to_owned();
    let b = RedisBackend::connect_cluster(&[&dead, &live])
        .await
        .unwrap();
    let k = common::unique_key("any-node");
    b.set(&k, b"v", LONG).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"v"[..]));
    assert!(b.delete(&k).await.unwrap());
    assert!(format!("{b:?}").contains("cluster: true"));
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn quick_restart_while_idle() {
    let mut server = PrivateRedis::start(&[]);
    let resp3 = RedisBackend::connect(&server.url()).await.unwrap();
    let resp2 = RedisBackend::connect(&format!("{}/?protocol=resp2", server.url()))
        .await
        .unwrap();
    let k = common::unique_key("quick-restart");
    resp3.set(&k, b"v", LONG).await.unwrap();
    resp2.set(&k, b"v", LONG).await.unwrap();

    // The server restarts while both backends are idle.
    server.kill();
    server.spawn();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // RESP3 (the default) saw the connection drop and reconnects: even a
    // non-repeatable operation succeeds at once.
    assert!(resp3.add(&k, b"tok", LONG).await.unwrap());
    assert_eq!(resp3.get(&k).await.unwrap().as_deref(), Some(&b"tok"[..]));

    // RESP2 learns of it only by failing once, then reconnects.
    let err = resp2.incr(&common::unique_key("n"), 1).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(resp2.get(&k).await.unwrap().as_deref(), Some(&b"tok"[..]));
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn a_lock_lost_in_a_server_restart_is_reported() {
    let mut server = PrivateRedis::start(&[]);
    let backend: SharedBackend = Arc::new(RedisBackend::connect(&server.url()).await.unwrap());
    let lock = cachelock::CacheLock::new(
        backend.clone(),
        common::unique_key("restart-lock"),
        cachelock::LockOptions::new().lease(Duration::from_secs(30)),
    )
    .unwrap();
    let mut guard = lock.try_acquire().await.unwrap();
    // Another CacheLock on the key (this one would be AlreadyHeld, issue 11).
    let someone = cachelock::CacheLock::new(
        backend.clone(),
        lock.key(),
        cachelock::LockOptions::new().lease(Duration::from_secs(30)),
    )
    .unwrap();
    let second = someone.try_acquire().await.unwrap_err();
    assert!(second.is_held(), "{second:?}");

    // The server restarts without persistence: the lock key is gone.
    server.kill();
    server.spawn();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let err = guard.extend(None).await.unwrap_err();
    assert!(err.is_lease_expired(), "{err:?}");
    assert!(guard.is_lost());
    assert_eq!(
        guard.release().await.unwrap(),
        cachelock::lock::Released::Lost
    );
    // Someone else can take it now.
    let other = lock.try_acquire().await.unwrap();
    assert_eq!(
        other.release().await.unwrap(),
        cachelock::lock::Released::Released
    );
}

/// Issue 10, item 18: an `add` whose reply was lost, though it was stored,
/// and which is sent again (by the Cluster client, or by a caller retrying
/// after an unavailable error) must find the lock its own, not "held".
#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn retried_add_whose_first_attempt_landed_is_ours() {
    let url = common::server_env("CACHELOCK_TEST_REDIS_URL");
    let upstream: std::net::SocketAddr = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("CACHELOCK_TEST_REDIS_URL is redis://IP:PORT");
    let proxy = common::fault_proxy::FaultProxy::start(upstream).await;
    let b = RedisBackend::connect_with(
        &format!("redis://{}", proxy.addr()),
        RedisOptions::new()
            .response_timeout(Duration::from_millis(500))
            .connect_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let direct = RedisBackend::connect(&url).await.unwrap();
    let k = common::unique_key("retried-add");

    // The SET reaches Redis; its reply is cut on the way back.
    proxy.cut_after_bytes(1);
    let first = b.add(&k, b"token-1", LONG).await;
    assert!(first.is_err(), "the reply was cut: {first:?}");
    assert_eq!(
        direct.get(&k).await.unwrap().as_deref(),
        Some(&b"token-1"[..]),
        "the first attempt was stored"
    );
    proxy.heal();

    // The retry, with the same token: ours.
    let mut retried = None;
    for _ in 0..5 {
        match b.add(&k, b"token-1", LONG).await {
            Ok(won) => {
                retried = Some(won);
                break;
            }
            Err(e) => assert!(e.is_unavailable(), "{e:?}"),
        }
    }
    assert_eq!(retried, Some(true), "a retry of our own stored add");
    // Anyone else still finds it held, and the value is unchanged.
    assert!(!b.add(&k, b"token-2", LONG).await.unwrap());
    assert!(!direct.add(&k, b"token-2", LONG).await.unwrap());
    assert_eq!(
        direct.get(&k).await.unwrap().as_deref(),
        Some(&b"token-1"[..])
    );
    assert!(direct.delete(&k).await.unwrap());
}

/// A Redis user that may not run scripts (`-@scripting` in its ACL): the
/// lock's add falls back to plain commands (its fence too) and works, but
/// the owner-checked release needs `EVALSHA` on a server without a native
/// compare-and-delete (Redis before 8.4), so it fails with the server's
/// error naming the command, and nothing is deleted unchecked. Memoize's
/// `set_if` falls back to a read then a write.
#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn a_user_denied_scripts_gets_an_error_naming_the_command() {
    use cachelock::{CacheLock, LockOptions};
    let server = PrivateRedis::start(&[
        "--user",
        "noscript",
        "on",
        ">pw",
        "~*",
        "&*",
        "+@all",
        "-@scripting",
    ]);
    let url = format!("redis://noscript:pw@127.0.0.1:{}", server.port);
    let backend: SharedBackend = Arc::new(RedisBackend::connect(&url).await.unwrap());
    let key = common::unique_key("noscript");
    // The add read with the value: the add, then MGET (a backend of its
    // own, so that the lock below meets the denial first).
    let reading = RedisBackend::connect(&url).await.unwrap();
    let value_key = common::unique_key("noscript-value");
    reading.set(&value_key, b"v", LONG).await.unwrap();
    let r = reading
        .add_reading(&key, b"tok", LONG, LockAdd::Queued, &[&value_key, &key])
        .await
        .unwrap();
    assert!(matches!(r.outcome, Queued::Granted(_)));
    let values: Vec<_> = r
        .values
        .unwrap()
        .into_iter()
        .map(|v| v.map(|v| v.to_vec()))
        .collect();
    assert_eq!(values, [Some(b"v".to_vec()), Some(b"tok".to_vec())]);
    assert!(reading.delete(&key).await.unwrap());
    for waits in [true, false] {
        let lock = CacheLock::new(backend.clone(), key.as_str(), LockOptions::new()).unwrap();
        let guard = if waits {
            lock.acquire().await.unwrap()
        } else {
            lock.try_acquire().await.unwrap()
        };
        let err = guard.release().await.unwrap_err();
        assert!(
            !err.is_unavailable(),
            "a permission error is not 'retry later': {err:?}"
        );
        assert!(err.to_string().to_lowercase().contains("evalsha"), "{err}");
        // The lock is still there (nothing deleted without the owner check).
        assert!(backend.get(&key).await.unwrap().is_some());
        assert!(backend.delete(&key).await.unwrap());
    }
    // Memoize's compare-and-set falls back to a read then a write.
    assert!(backend.set_if(&key, None, b"a", LONG).await.unwrap());
    assert!(!backend.set_if(&key, Some(b"b"), b"c", LONG).await.unwrap());
    assert!(backend.set_if(&key, Some(b"a"), b"c", LONG).await.unwrap());
    assert_eq!(backend.get(&key).await.unwrap().as_deref(), Some(&b"c"[..]));
}

/// Waits until the backend answers again (after a restart).
async fn answers(b: &SharedBackend) {
    let start = Instant::now();
    while b.get("probe").await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 8 tasks × 200 grants per phase; between phases the counter is lost to a
/// FLUSHALL and then to a restart of the server. The fences rise in grant
/// order throughout: a lost counter restarts from the server-time floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the test servers: scripts/test"]
async fn fences_rise_across_flushall_and_restart() {
    let mut server = PrivateRedis::start(&[]);
    let b: SharedBackend = Arc::new(RedisBackend::connect(&server.url()).await.unwrap());
    let k = common::unique_key("fence-resets");
    let mut fences = common::lock_cases::fences_in_grant_order(b.clone(), &k, 8, 200).await;
    let st = Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "FLUSHALL"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(b.fence(&k).await.unwrap(), None, "the counter is gone");
    fences.extend(common::lock_cases::fences_in_grant_order(b.clone(), &k, 8, 200).await);
    server.restart();
    answers(&b).await;
    assert_eq!(b.fence(&k).await.unwrap(), None, "the counter is gone");
    fences.extend(common::lock_cases::fences_in_grant_order(b.clone(), &k, 8, 200).await);
    assert_eq!(fences.len(), 600);
    common::lock_cases::assert_strictly_increasing(&fences);
}
