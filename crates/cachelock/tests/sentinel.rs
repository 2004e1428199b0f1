//! Redis Sentinel (issue 13): `redis+sentinel://` against the master and
//! replica watched by three Sentinels that `scripts/services` starts, and a
//! failover while locks are held.
//!
//! The failover loses a write for real, as a crash does with Redis'
//! asynchronous replication: the replica is frozen (SIGSTOP) while a lock
//! and a memoized value are written to the master only, then the master is
//! frozen and the replica thawed; the Sentinels promote the replica, and the
//! old master, thawed after the failover, is turned into a replica of the
//! new one (losing those writes).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachelock::{BackendUrl, Cache, CacheLock, LockOptions, Released, SharedBackend};
use common::{server_env, unique_key};

const SERVICE: &str = "cachelock-test";

/// `redis-cli -p PORT ARGS...`, its output.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli (scripts/services installs redis-tools)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A field of `INFO` (`name:value` lines).
fn info_field(port: u16, section: &str, name: &str) -> Option<String> {
    redis_cli(port, &["info", section]).lines().find_map(|l| {
        l.trim()
            .strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::to_owned)
    })
}

struct Topology {
    url: String,
    sentinels: Vec<u16>,
    nodes: Vec<u16>,
}

fn port_of(hostport: &str) -> u16 {
    hostport.rsplit(':').next().unwrap().parse().unwrap()
}

fn topology() -> Topology {
    let url = server_env("CACHELOCK_TEST_REDIS_SENTINEL_URL");
    let nodes = server_env("CACHELOCK_TEST_REDIS_SENTINEL_NODES")
        .split(',')
        .map(port_of)
        .collect();
    let Ok(BackendUrl::RedisSentinel(target)) = BackendUrl::parse(&url) else {
        panic!("{url} is not a redis+sentinel:// URL");
    };
    let sentinels = target.sentinels().iter().map(|(_, p)| *p).collect();
    Topology {
        url,
        sentinels,
        nodes,
    }
}

impl Topology {
    /// The master's port, as the first Sentinel names it.
    fn master(&self) -> Option<u16> {
        let out = redis_cli(
            self.sentinels[0],
            &["sentinel", "get-master-addr-by-name", SERVICE],
        );
        out.lines().nth(1).and_then(|p| p.trim().parse().ok())
    }

    /// Waits (bounded) until every Sentinel names the same master, which
    /// says it is one and has its replica in sync; returns (master, replica).
    fn wait_healthy(&self, limit: Duration) -> (u16, u16) {
        let t = Instant::now();
        loop {
            let agreed = self.sentinels.iter().all(|s| {
                let out = redis_cli(*s, &["sentinel", "get-master-addr-by-name", SERVICE]);
                out.lines()
                    .nth(1)
                    .and_then(|p| p.trim().parse::<u16>().ok())
                    == self.master()
            });
            if let Some(master) = self.master().filter(|_| agreed) {
                let replica = *self.nodes.iter().find(|p| **p != master).unwrap();
                if info_field(master, "replication", "role").as_deref() == Some("master")
                    && info_field(replica, "replication", "master_link_status").as_deref()
                        == Some("up")
                    && info_field(replica, "replication", "master_port")
                        .is_some_and(|p| p == master.to_string())
                {
                    return (master, replica);
                }
            }
            assert!(
                t.elapsed() < limit,
                "the Sentinel test servers did not become healthy within {limit:?}: {:?}",
                self.nodes
                    .iter()
                    .map(|p| redis_cli(*p, &["info", "replication"]))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn pid(port: u16) -> String {
    info_field(port, "server", "process_id").expect("the server's pid")
}

fn signal(sig: &str, pid: &str) {
    assert!(
        Command::new("kill")
            .args([&format!("-{sig}"), pid])
            .status()
            .unwrap()
            .success()
    );
}

async fn connect(url: &str) -> SharedBackend {
    BackendUrl::parse(url).unwrap().connect().await.unwrap()
}

#[test]
fn sentinel_urls_parse_and_show_no_password() {
    let url = BackendUrl::parse("redis+sentinel://:hunter2@h1:26379,h2/mymaster/2").unwrap();
    let BackendUrl::RedisSentinel(target) = &url else {
        panic!("{url:?}");
    };
    assert_eq!(
        target.sentinels(),
        [("h1".to_owned(), 26379), ("h2".to_owned(), 26379)]
    );
    assert_eq!(target.service(), "mymaster");
    assert_eq!(url.kind(), "redis-sentinel");
    assert_eq!(
        url.to_string(),
        "redis+sentinel://h1:26379,h2:26379/mymaster/2"
    );
    assert!(!format!("{url:?}").contains("hunter2"));
    for (bad, why) in [
        ("redis+sentinel://h1:1", "service"),
        ("redis+sentinel:///svc", "at least one"),
        ("redis+sentinel://h1:1,,h2/svc", "stray comma"),
        ("redis+sentinel://h1:99999/svc", "port"),
        ("redis+sentinel://h1/svc/x", "database"),
        ("redis+sentinel://h1/svc/1/2", "expected /service"),
        ("redis+sentinel://h1/s%20v", "service name"),
        ("redis+sentinel://:pw@h1/svc?x=1", "no query"),
    ] {
        let err = BackendUrl::parse(bad).unwrap_err().to_string();
        assert!(err.contains(why), "{bad}: {err}");
        assert!(!err.contains("pw@"), "{err}");
    }
}

/// A Sentinel that knows no such service: a connect error, fast.
#[tokio::test]
#[ignore = "needs the test servers: scripts/test"]
async fn an_unknown_service_is_a_connect_error() {
    let topo = topology();
    let url = format!(
        "redis+sentinel://127.0.0.1:{}/no-such-service",
        topo.sentinels[0]
    );
    let t = Instant::now();
    let err = BackendUrl::parse(&url)
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no-such-service"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the test servers: scripts/test"]
async fn a_failover_loses_unreplicated_locks_loudly_and_locks_work_again() {
    let topo = topology();
    let (master, replica) = topo.wait_healthy(Duration::from_secs(30));
    let backend = connect(&topo.url).await;
    let lease = Duration::from_secs(10);
    let opts = LockOptions::default().lease(lease);
    let cache = Cache::builder(backend.clone())
        .namespace(unique_key("sentinel-memo"))
        .build()
        .unwrap();
    let computed = Arc::new(AtomicUsize::new(0));
    let compute = |v: &'static str| {
        let computed = computed.clone();
        move || async move {
            computed.fetch_add(1, Ordering::SeqCst);
            v.to_owned()
        }
    };

    // Replicated before the failover: survives it. Its lease is long
    // enough to outlast the failover (a few seconds, each attempt on the
    // frozen master bounded by the 2 s response timeout).
    let kept_opts = LockOptions::default().lease(Duration::from_secs(30));
    let kept = CacheLock::new(backend.clone(), unique_key("kept"), kept_opts).unwrap();
    let kept = kept.try_acquire().await.unwrap();
    kept.keep_alive();
    assert_eq!(cache.get_with("replicated", compute("r1")).await, "r1");
    assert_eq!(redis_cli(master, &["wait", "1", "2000"]).trim(), "1");

    // Written to the master only: the replica is frozen, and its link is
    // cut (else the kernel would buffer the stream for it).
    let (master_pid, replica_pid) = (pid(master), pid(replica));
    signal("STOP", &replica_pid);
    assert_eq!(
        redis_cli(master, &["client", "kill", "type", "replica"]).trim(),
        "1"
    );
    let lost_key = unique_key("lost");
    let lost = CacheLock::new(backend.clone(), lost_key.clone(), opts.clone()).unwrap();
    let lost = lost.try_acquire().await.unwrap();
    lost.keep_alive();
    assert_eq!(cache.get_with("unreplicated", compute("u1")).await, "u1");
    assert_eq!(computed.load(Ordering::SeqCst), 2);

    // The master "crashes" (frozen), the replica comes back and is promoted.
    let crashed = Instant::now();
    signal("STOP", &master_pid);
    signal("CONT", &replica_pid);
    let fresh = CacheLock::new(backend.clone(), unique_key("fresh"), opts.clone()).unwrap();
    let new_guard = loop {
        match fresh.try_acquire().await {
            Ok(g) => break g,
            Err(e) => {
                assert!(
                    crashed.elapsed() < Duration::from_secs(30),
                    "no new lock within 30 s of the master's failure: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let recovered = crashed.elapsed();
    assert_eq!(topo.master(), Some(replica), "the replica was promoted");
    // The old master wakes after the failover and becomes a replica.
    signal("CONT", &master_pid);
    println!(
        "sentinel: new locks work again {:.1} s after the master failed",
        recovered.as_secs_f64()
    );

    // The lock that was not replicated is reported lost by its keep-alive
    // (the key is gone on the new master), and its release says so.
    tokio::time::timeout(lease, lost.lost())
        .await
        .expect("the failover's lost lock was not reported lost within a lease");
    let detected = crashed.elapsed();
    let outcome = lost.release().await.unwrap();
    assert_ne!(outcome, Released::Released, "a lost lock released silently");
    println!(
        "sentinel: the lost lock was reported lost {:.1} s after the master failed ({outcome:?})",
        detected.as_secs_f64()
    );
    // Its key is free on the new master: another holder gets it.
    let other = CacheLock::new(backend.clone(), lost_key, opts.clone()).unwrap();
    let other = other.try_acquire().await.unwrap();

    // The replicated lock kept its lease through the failover.
    assert!(!kept.is_lost(), "the replicated lock was lost");
    assert_eq!(kept.release().await.unwrap(), Released::Released);
    assert_eq!(new_guard.release().await.unwrap(), Released::Released);
    assert_eq!(other.release().await.unwrap(), Released::Released);

    // Memoize: the replicated value is served; the lost one is computed
    // again (not a wrong or stale value).
    assert_eq!(cache.get_with("replicated", compute("r2")).await, "r1");
    assert_eq!(cache.get_with("unreplicated", compute("u2")).await, "u2");
    assert_eq!(computed.load(Ordering::SeqCst), 3);
    cache.close().await;

    // Leave the servers healthy for the next run (roles swapped).
    topo.wait_healthy(Duration::from_secs(60));
}
