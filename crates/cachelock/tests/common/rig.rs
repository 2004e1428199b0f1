//! The fault-scenario rig: a PRIVATE Redis or Memcached, a [`FaultProxy`]
//! in front of it, and a cachelock backend connected THROUGH the proxy.
//! A scenario is written once over a [`Rig`] and run for both kinds.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cachelock::{
    BackendError, CacheLock, LockOptions, MemcachedBackend, MemcachedOptions, RedisBackend,
    RedisOptions, Released, SharedBackend,
};
use tokio::time::Instant;

use super::fault_proxy::FaultProxy;
use super::servers::{PrivateMemcached, PrivateRedis, closed_port};
use super::unique_key;

/// Which server a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Memcached,
}

enum Server {
    Redis(PrivateRedis),
    Memcached(PrivateMemcached),
}

/// How the rig is built.
#[derive(Debug, Clone)]
pub struct RigOptions {
    /// The backend's response timeout (and connect timeout).
    pub response_timeout: Duration,
    /// Extra `memcached` arguments (`-m`, `-I`); Redis ignores them.
    pub memcached_args: Vec<String>,
    /// Extra `redis-server` arguments; Memcached ignores them.
    pub redis_args: Vec<String>,
}

impl Default for RigOptions {
    fn default() -> Self {
        Self {
            response_timeout: Duration::from_millis(500),
            memcached_args: vec!["-m".into(), "16".into()],
            redis_args: Vec::new(),
        }
    }
}

/// A private server behind a fault proxy, and a backend that goes through it.
pub struct Rig {
    pub kind: Kind,
    server: Server,
    pub proxy: FaultProxy,
    /// Connected through the proxy.
    pub backend: SharedBackend,
    pub options: RigOptions,
}

impl Rig {
    /// A rig with the default options (the test fails when the server
    /// program is not installed).
    pub async fn start(kind: Kind) -> Rig {
        Self::start_with(kind, RigOptions::default()).await
    }

    pub async fn start_with(kind: Kind, options: RigOptions) -> Rig {
        let server = match kind {
            Kind::Redis => {
                let args: Vec<&str> = options.redis_args.iter().map(String::as_str).collect();
                Server::Redis(PrivateRedis::start(&args))
            }
            Kind::Memcached => {
                let args: Vec<&str> = options.memcached_args.iter().map(String::as_str).collect();
                Server::Memcached(PrivateMemcached::start_with(closed_port(), &args))
            }
        };
        let upstream = match &server {
            Server::Redis(s) => s.addr(),
            Server::Memcached(s) => s.addr(),
        };
        let proxy = FaultProxy::start(upstream).await;
        let backend = connect(kind, &proxy_url(kind, &proxy), &options)
            .await
            .expect("connect through the fault proxy");
        Rig {
            kind,
            server,
            proxy,
            backend,
            options,
        }
    }

    /// A second client, connected straight to the server (no faults).
    pub async fn direct(&self) -> SharedBackend {
        let url = match &self.server {
            Server::Redis(s) => s.url(),
            Server::Memcached(s) => s.url(),
        };
        connect(self.kind, &url, &self.options)
            .await
            .expect("connect straight to the private server")
    }

    /// A second client through the same proxy (its own connections).
    pub async fn another_client(&self) -> SharedBackend {
        connect(self.kind, &proxy_url(self.kind, &self.proxy), &self.options)
            .await
            .expect("connect through the fault proxy")
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        match &mut self.server {
            Server::Redis(s) => s.kill(),
            Server::Memcached(s) => s.stop(),
        }
    }

    /// Starts the killed server again, empty, on the same port.
    pub fn spawn(&mut self) {
        match &mut self.server {
            Server::Redis(s) => s.spawn(),
            Server::Memcached(s) => s.spawn(),
        }
    }
}

fn proxy_url(kind: Kind, proxy: &FaultProxy) -> String {
    match kind {
        Kind::Redis => format!("redis://{}", proxy.addr()),
        Kind::Memcached => format!("memcached://{}", proxy.addr()),
    }
}

async fn connect(kind: Kind, url: &str, o: &RigOptions) -> Result<SharedBackend, BackendError> {
    Ok(match kind {
        Kind::Redis => Arc::new(
            RedisBackend::connect_with(
                url,
                RedisOptions::new()
                    .connect_timeout(o.response_timeout)
                    .response_timeout(o.response_timeout),
            )
            .await?,
        ),
        Kind::Memcached => Arc::new(
            MemcachedBackend::connect_with(
                url,
                MemcachedOptions::new()
                    .connect_timeout(o.response_timeout)
                    .response_timeout(o.response_timeout),
            )
            .await?,
        ),
    })
}

/// Runs a scenario with a hard bound on its duration.
pub async fn bounded<F: Future>(limit: Duration, scenario: F) -> F::Output {
    match tokio::time::timeout(limit, scenario).await {
        Ok(out) => out,
        Err(_) => panic!("scenario did not finish within {limit:?} (a hang)"),
    }
}

/// Repeats `op` while it fails with an "unavailable" error (the way a caller
/// retries after a fault), for at most 10 s. Any other outcome is returned.
pub async fn retry_unavailable<T, E, F, Fut>(
    mut op: F,
    unavailable: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match op().await {
            Err(e) if unavailable(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Checks that the backend works again by itself (no reconnect by hand):
/// within a few retries a value round-trips and a lock is taken, excludes a
/// second holder, and is released.
pub async fn assert_recovers(backend: &SharedBackend) {
    let k = unique_key("recovers");
    retry_unavailable(
        || backend.set(&k, b"recovered", Duration::from_secs(60)),
        BackendError::is_unavailable,
    )
    .await
    .expect("the backend recovers by itself");
    assert_eq!(
        backend
            .get(&k)
            .await
            .expect("get after recovery")
            .as_deref(),
        Some(&b"recovered"[..])
    );
    let lock = CacheLock::new(
        backend.clone(),
        unique_key("recovers-lock"),
        LockOptions::new().lease(Duration::from_secs(10)),
    )
    .expect("lock options");
    let guard = lock.try_acquire().await.expect("a lock after recovery");
    // Another CacheLock (this one would be AlreadyHeld, issue 11).
    let again = CacheLock::new(
        backend.clone(),
        lock.key(),
        LockOptions::new().lease(Duration::from_secs(10)),
    )
    .expect("lock options");
    let second = again.try_acquire().await.expect_err("exclusion");
    assert!(second.is_held(), "{second:?}");
    assert_eq!(guard.release().await.expect("release"), Released::Released);
}
