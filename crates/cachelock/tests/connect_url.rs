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
