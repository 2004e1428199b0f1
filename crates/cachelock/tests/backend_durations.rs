//! Any `Duration` given to a backend (a TTL, a timeout) never panics
//! (issue 10, item 9, backend half): the longest ones are cut to a
//! documented maximum.
#![allow(clippy::unwrap_used)]
mod common;

use std::time::Duration;

use cachelock::{Backend, MemoryBackend, TokenCheck};

const HUGE: [Duration; 3] = [
    Duration::MAX,
    Duration::from_secs(u64::MAX),
    Duration::from_secs(1 << 40),
];

#[tokio::test(start_paused = true)]
async fn memory_backend_takes_any_ttl() {
    let cache = MemoryBackend::new();
    for (i, ttl) in HUGE.into_iter().enumerate() {
        let k = format!("k{i}");
        cache.set(&k, b"v", ttl).await.unwrap();
        assert!(!cache.add(&k, b"w", ttl).await.unwrap());
        assert!(cache.add(&format!("a{i}"), b"w", ttl).await.unwrap());
        assert!(cache.touch(&k, ttl).await.unwrap());
        assert_eq!(
            cache.extend_if_eq(&k, b"v", ttl).await.unwrap(),
            TokenCheck::Matched
        );
        cache.set_many(&[(&k, b"v")], ttl).await.unwrap();
        // Cut to 100 years, not turned into "already expired".
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(cache.get(&k).await.unwrap().as_deref(), Some(&b"v"[..]));
        let left = cache.ttl(&k).await.unwrap().unwrap();
        assert!(left > Duration::from_secs(99 * 365 * 24 * 3600), "{left:?}");
    }
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_options_take_any_timeout() {
    use cachelock::{RedisBackend, RedisOptions};
    let port = common::servers::closed_port();
    let url = format!("redis://127.0.0.1:{port}");
    for t in HUGE {
        let options = RedisOptions::new().connect_timeout(t).response_timeout(t);
        let err = RedisBackend::connect_with(&url, options).await.unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
    }
}

#[cfg(feature = "redis")]
#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn redis_operations_take_any_ttl_and_timeout() {
    use cachelock::{RedisBackend, RedisOptions};
    let url = common::server_env("CACHELOCK_TEST_REDIS_URL");
    let options = RedisOptions::new()
        .connect_timeout(Duration::MAX)
        .response_timeout(Duration::MAX);
    let b = RedisBackend::connect_with(&url, options).await.unwrap();
    let k = common::unique_key("huge-ttl");
    for ttl in HUGE {
        b.set(&k, b"v", ttl).await.unwrap();
        assert!(b.touch(&k, ttl).await.unwrap());
        assert_eq!(
            b.extend_if_eq(&k, b"v", ttl).await.unwrap(),
            TokenCheck::Matched
        );
    }
    assert!(b.delete(&k).await.unwrap());
}

#[cfg(feature = "memcached")]
#[tokio::test]
async fn memcached_options_take_any_timeout() {
    use cachelock::{MemcachedBackend, MemcachedOptions};
    let port = common::servers::closed_port();
    let url = format!("memcached://127.0.0.1:{port}");
    for t in HUGE {
        let options = MemcachedOptions::new()
            .connect_timeout(t)
            .response_timeout(t);
        let err = MemcachedBackend::connect_with(&url, options)
            .await
            .unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
    }
}
