//! `cachelock::connect` by URL on every test server: each arm gives a
//! working backend, and an unreachable server is a typed error.
#![allow(clippy::unwrap_used)]
mod common;

use std::time::Duration;

use cachelock::{BackendError, connect};

async fn round_trip(url: &str) {
    let cache = connect(url).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let k = common::unique_key("connect-url");
    assert!(
        cache.add(&k, b"v", Duration::from_secs(30)).await.unwrap(),
        "{url}"
    );
    assert!(
        !cache.add(&k, b"w", Duration::from_secs(30)).await.unwrap(),
        "{url}"
    );
    assert_eq!(
        cache.get(&k).await.unwrap().as_deref(),
        Some(&b"v"[..]),
        "{url}"
    );
    assert!(cache.delete(&k).await.unwrap(), "{url}");
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn redis_by_url() {
    round_trip(&common::server_env("CACHELOCK_TEST_REDIS_URL")).await;
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn redis_cluster_by_url() {
    let urls = common::server_env("CACHELOCK_TEST_REDIS_CLUSTER_URLS");
    let hosts: Vec<&str> = urls
        .split(',')
        .map(|u| u.trim().trim_start_matches("redis://"))
        .collect();
    round_trip(&format!("redis+cluster://{}", hosts.join(","))).await;
}

#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn memcached_by_url() {
    round_trip(&common::server_env("CACHELOCK_TEST_MEMCACHED_URLS")).await;
}

#[tokio::test]
async fn memory_by_url() {
    round_trip("memory://").await;
}

#[tokio::test]
async fn unreachable_servers_are_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for url in [
        format!("redis://127.0.0.1:{port}"),
        format!("redis+cluster://127.0.0.1:{port}"),
        format!("memcached://127.0.0.1:{port}"),
    ] {
        let err = connect(&url).await.unwrap_err();
        assert!(err.is_unavailable(), "{url}: {err:?}");
        assert!(!err.to_string().contains('\n'), "{url}: one line: {err}");
    }
    let err = connect("redis://:pw@127.0.0.1:0").await.unwrap_err();
    assert!(matches!(err, BackendError::InvalidUrl { .. }), "{err:?}");
    assert!(!err.to_string().contains("pw@"), "{err}");
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Issue 10, item 14: a configuration the client refuses is not
/// "unavailable" (which means: retry later).
#[cfg(feature = "redis")]
#[tokio::test]
async fn configuration_errors_are_not_unavailable() {
    use cachelock::{RedisBackend, RedisOptions};
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let zero = RedisOptions::new().connect_timeout(Duration::ZERO);
    let err = RedisBackend::connect_with(&url, zero).await.unwrap_err();
    assert!(!err.is_unavailable(), "zero timeout: {err:?}");
    let zero = RedisOptions::new().max_value_size(0);
    let err = RedisBackend::connect_with(&url, zero).await.unwrap_err();
    assert!(!err.is_unavailable(), "zero size: {err:?}");
    let err = RedisBackend::connect_cluster(&[]).await.unwrap_err();
    assert!(!err.is_unavailable(), "no nodes: {err:?}");
    let bad_ca = RedisOptions::new().tls_root_certificate(b"not a PEM file".to_vec());
    let tls = format!("rediss://127.0.0.1:{}", closed_port());
    let err = RedisBackend::connect_with(&tls, bad_ca).await.unwrap_err();
    assert!(!err.is_unavailable(), "bad CA: {err:?}");
}

/// Issue 10, item 15: a connect error is about no key; it names the server
/// instead of carrying an empty key.
#[tokio::test]
async fn connect_errors_name_the_server_not_an_empty_key() {
    let port = closed_port();
    for url in [
        format!("redis://127.0.0.1:{port}"),
        format!("redis+cluster://127.0.0.1:{port}"),
        format!("memcached://127.0.0.1:{port}"),
    ] {
        let err = connect(&url).await.unwrap_err();
        assert!(err.is_unavailable(), "{url}: {err:?}");
        assert!(!err.key().is_empty(), "{url}: {err:?}");
        assert!(!format!("{err:?}").contains("key: \"\""), "{url}: {err:?}");
        assert!(err.to_string().contains(&port.to_string()), "{url}: {err}");
    }
}

/// Issue 10, item 13: one parser and one redaction. A password in a
/// `pass=` query parameter is hidden by Display, Debug and errors, and a
/// scheme accepted by `BackendUrl::parse` is not refused when connecting.
#[tokio::test]
async fn urls_are_parsed_once_and_redacted_everywhere() {
    let url = "redis+unix:///nonexistent-cachelock.sock?pass=hunter2";
    let parsed = cachelock::BackendUrl::parse(url).unwrap();
    assert!(!parsed.to_string().contains("hunter2"), "{parsed}");
    assert!(!format!("{parsed:?}").contains("hunter2"), "{parsed:?}");
    let err = connect(url).await.unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    let parsed = cachelock::BackendUrl::parse("redis://:hunter2@h:1/0").unwrap();
    assert!(!format!("{parsed:?}").contains("hunter2"), "{parsed:?}");

    let port = closed_port();
    for url in [
        format!("REDIS://127.0.0.1:{port}"),
        format!("Redis+Cluster://127.0.0.1:{port}"),
        format!("MEMCACHED://127.0.0.1:{port}"),
    ] {
        cachelock::BackendUrl::parse(&url).unwrap();
        let err = connect(&url).await.unwrap_err();
        assert!(
            !matches!(err, BackendError::InvalidUrl { .. }),
            "{url}: accepted by one parser, refused by the next: {err:?}"
        );
        assert!(err.is_unavailable(), "{url}: {err:?}");
    }
}
