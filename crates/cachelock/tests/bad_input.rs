//! Bad input (issue 6): keys with NUL, newline, spaces and protocol
//! injections, 1 MB keys, through the KeyBuilder and raw into every backend;
//! values at and over every size limit. Each gets a clear error or works;
//! nothing panics, nothing collides, and nothing valid is lost. Run on the
//! embedded backend, Redis and Memcached (the shared test servers).
#![cfg(all(feature = "redis", feature = "memcached"))]
#![allow(clippy::unwrap_used)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use cachelock::key::is_memcached_safe;
use cachelock::{
    BackendError, CacheLock, KeyBuilder, LockOptions, MemcachedBackend, MemoryBackend,
    RedisBackend, RedisOptions, Released, SharedBackend, TokenCheck,
};
use common::unique_key;

const LONG: Duration = Duration::from_secs(60);

/// The embedded backend and, when the test servers are up, Redis and
/// Memcached (all three servers).
async fn backends() -> Vec<(&'static str, SharedBackend)> {
    let mut out: Vec<(&'static str, SharedBackend)> =
        vec![("memory", Arc::new(MemoryBackend::new()))];
    if let Some(url) = common::server_env("CACHELOCK_TEST_REDIS_URL") {
        out.push((
            "redis",
            Arc::new(RedisBackend::connect(&url).await.unwrap()),
        ));
    }
    if let Some(urls) = common::server_env("CACHELOCK_TEST_MEMCACHED_URLS") {
        out.push((
            "memcached",
            Arc::new(MemcachedBackend::connect(&urls).await.unwrap()),
        ));
    }
    out
}

/// Nasty key material: control bytes, spaces, protocol injections for both
/// servers' text protocols, escapes that look like the builder's own,
/// non-ASCII, and very long keys.
fn nasty_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "a\0b",
        "\0",
        "a\nb",
        "a\r\nb",
        "a b",
        " ",
        "\t\x7f\x01",
        "k 0 0 1\r\nX\r\nset evil 0 0 4\r\nevil",
        "k\r\nmg evil v\r\n",
        "*1\r\n$4\r\nPING\r\n",
        "a\\x00b",
        "a%3Ab:c",
        "é clé ünïcödé 🔒",
        "b64:YWJj",
    ]
    .map(String::from)
    .to_vec();
    keys.push("k".repeat(250));
    keys.push("k".repeat(251));
    keys.push("k".repeat(1 << 20));
    keys.push("é".repeat(1 << 19));
    keys.push(format!("{}\n{}", "x".repeat(300), " ".repeat(300)));
    keys
}

/// Every key built by the KeyBuilder from nasty input is Memcached-safe,
/// works in every backend, and distinct inputs keep distinct values.
#[tokio::test]
async fn nasty_keys_through_the_key_builder() {
    let keys = KeyBuilder::new(unique_key("bad-keys"));
    let secret = KeyBuilder::new("ns").secret(b"secret".to_vec());
    for (name, b) in backends().await {
        let mut built = Vec::new();
        for (i, raw) in nasty_keys().iter().enumerate() {
            for k in [
                keys.build(raw.as_str()),
                keys.build([raw.as_str(), "part"]),
                secret.build(raw.as_str()),
            ] {
                assert!(is_memcached_safe(&k), "{name}: unsafe built key {k:?}");
                built.push((k, format!("value {i}")));
            }
        }
        for (k, v) in &built {
            b.set(k, v.as_bytes(), LONG).await.unwrap();
        }
        // No two inputs collided (a shared key would hold a later value;
        // the seed's own escape makes "a\0b" and "a\\x00b" one key, which
        // is excluded here by giving both a value of their own index).
        for (k, v) in &built {
            let got = b.get(k).await.unwrap();
            let got = String::from_utf8(got.unwrap().to_vec()).unwrap();
            let same_key_values: Vec<&String> = built
                .iter()
                .filter(|(k2, _)| k2 == k)
                .map(|(_, v)| v)
                .collect();
            assert!(
                same_key_values.contains(&&got),
                "{name}: key {k:?} holds {got:?}, expected {v:?}"
            );
        }
        // A lock on a built nasty key works and excludes.
        let lock = CacheLock::new(
            b.clone(),
            keys.build("lock \n\0 key"),
            LockOptions::default(),
        )
        .unwrap();
        let g = lock.try_acquire().await.unwrap();
        assert!(lock.try_acquire().await.unwrap_err().is_held());
        assert_eq!(g.release().await.unwrap(), Released::Released);
    }
}

/// The same keys given raw to every backend operation: each works (the
/// Memcached backend encodes what it cannot send as is) or is a clear
/// error; never a panic, never a protocol injection, and the connection
/// stays in step afterwards.
#[tokio::test]
async fn nasty_keys_raw_into_every_backend_operation() {
    for (name, b) in backends().await {
        let marker = unique_key("raw-marker");
        b.set(&marker, b"marker", LONG).await.unwrap();
        let prefix = unique_key("raw");
        for (i, raw) in nasty_keys().iter().enumerate() {
            let k = format!("{prefix}{raw}");
            let v = format!("raw value {i}");
            let ok = |r: Result<(), BackendError>| match r {
                Ok(()) => true,
                Err(BackendError::InvalidKey { .. }) => false,
                Err(e) => panic!("{name}: key {i}: not a clear error: {e:?}"),
            };
            if !ok(b.set(&k, v.as_bytes(), LONG).await) {
                continue;
            }
            assert_eq!(
                b.get(&k).await.unwrap().as_deref(),
                Some(v.as_bytes()),
                "{name}: key {i}"
            );
            let many = b.get_many(&[&k, &marker]).await.unwrap();
            assert_eq!(many[0].as_deref(), Some(v.as_bytes()), "{name}: key {i}");
            assert_eq!(many[1].as_deref(), Some(&b"marker"[..]), "{name}: key {i}");
            assert!(!b.add(&k, b"other", LONG).await.unwrap(), "{name}: key {i}");
            assert!(b.touch(&k, LONG).await.unwrap(), "{name}: key {i}");
            assert_eq!(
                b.extend_if_eq(&k, v.as_bytes(), LONG).await.unwrap(),
                TokenCheck::Matched
            );
            assert_eq!(
                b.delete_if_eq(&k, b"not it", LONG).await.unwrap(),
                TokenCheck::Mismatch
            );
            assert_eq!(
                b.delete_if_eq(&k, v.as_bytes(), LONG).await.unwrap(),
                TokenCheck::Matched
            );
            assert_eq!(b.get(&k).await.unwrap(), None, "{name}: key {i}");
            b.set_many(&[(&k, b"many"), (&marker, b"marker")], LONG)
                .await
                .unwrap();
            assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"many"[..]));
            assert_eq!(b.incr(&format!("{k}#n"), 3).await.unwrap(), 3);
            assert!(b.delete(&k).await.unwrap());
            let _ = b.delete(&format!("{k}#n")).await;
        }
        // Nothing was injected: the marker is intact and no "evil" key
        // appeared.
        assert_eq!(
            b.get(&marker).await.unwrap().as_deref(),
            Some(&b"marker"[..])
        );
        assert_eq!(b.get("evil").await.unwrap(), None, "{name}: injection");
    }
}

/// A lock key given raw (not built) with spaces, newlines and a 1 MB
/// length: the lock works, or fails with a backend error; it is never
/// reported as held by someone else.
#[tokio::test]
async fn raw_lock_keys() {
    assert!(
        CacheLock::new(Arc::new(MemoryBackend::new()), "", LockOptions::default())
            .unwrap_err()
            .to_string()
            .contains("must be provided")
    );
    for (name, b) in backends().await {
        for raw in [" \n\0", "a b\r\nc", &"L".repeat(1 << 20)] {
            let key = format!("{}{raw}", unique_key("raw-lock"));
            let lock = CacheLock::new(b.clone(), key, LockOptions::default()).unwrap();
            match lock.try_acquire().await {
                Ok(g) => {
                    assert!(lock.try_acquire().await.unwrap_err().is_held(), "{name}");
                    assert_eq!(g.release().await.unwrap(), Released::Released, "{name}");
                }
                Err(e) => assert!(e.as_backend().is_some(), "{name}: {e:?}"),
            }
        }
    }
}

/// Exactly the backend's `max_value_size` is stored; one byte more is
/// `ValueTooLarge` naming the key, on set, add and set_many, and nothing is
/// stored. An empty value is fine.
async fn check_value_limits(name: &str, b: &SharedBackend) {
    let limit = b.max_value_size();
    let k = unique_key("limit");
    let exact = vec![0xA5u8; limit];
    let over = vec![0x5Au8; limit + 1];

    b.set(&k, &exact, LONG).await.unwrap();
    assert_eq!(
        b.get(&k).await.unwrap().as_deref(),
        Some(&exact[..]),
        "{name}"
    );

    let too_large = |e: BackendError| match e {
        BackendError::ValueTooLarge {
            key,
            size,
            limit: l,
        } => {
            assert_eq!((size, l), (limit + 1, limit), "{name}");
            key
        }
        other => panic!("{name}: expected ValueTooLarge, got {other:?}"),
    };
    assert_eq!(too_large(b.set(&k, &over, LONG).await.unwrap_err()), k);
    assert_eq!(
        b.get(&k).await.unwrap().as_deref(),
        Some(&exact[..]),
        "{name}: the refused set changed nothing"
    );
    let k2 = unique_key("limit-add");
    assert_eq!(too_large(b.add(&k2, &over, LONG).await.unwrap_err()), k2);
    assert_eq!(b.get(&k2).await.unwrap(), None, "{name}");
    assert!(b.add(&k2, &exact, LONG).await.unwrap(), "{name}");
    let k3 = unique_key("limit-many");
    let err = b
        .set_many(&[(&k3, b"small"), (&k2, &over)], LONG)
        .await
        .unwrap_err();
    assert_eq!(too_large(err), k2);
    b.set_many(&[(&k3, &exact[..]), (&k2, b"")], LONG)
        .await
        .unwrap();
    assert_eq!(b.get(&k3).await.unwrap().as_deref(), Some(&exact[..]));
    assert_eq!(b.get(&k2).await.unwrap().as_deref(), Some(&b""[..]));
    for k in [&k, &k2, &k3] {
        b.delete(k).await.unwrap();
    }
}

#[tokio::test]
async fn values_at_and_over_the_size_limit() {
    let small: SharedBackend = Arc::new(MemoryBackend::new().with_max_value_size(1000));
    check_value_limits("memory (1000)", &small).await;
    let default: SharedBackend = Arc::new(MemoryBackend::new());
    check_value_limits("memory (default)", &default).await;
    if let Some(url) = common::server_env("CACHELOCK_TEST_REDIS_URL") {
        let b: SharedBackend = Arc::new(
            RedisBackend::connect_with(&url, RedisOptions::new().max_value_size(4096))
                .await
                .unwrap(),
        );
        check_value_limits("redis (4096)", &b).await;
    }
    if let Some(urls) = common::server_env("CACHELOCK_TEST_MEMCACHED_URLS") {
        // The limit the servers reported (item_size_max less overhead).
        let b: SharedBackend = Arc::new(MemcachedBackend::connect(&urls).await.unwrap());
        check_value_limits("memcached", &b).await;
    }
}
