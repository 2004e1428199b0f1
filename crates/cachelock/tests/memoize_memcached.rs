//! The memoize and memoize_stream cases against three real Memcached
//! servers (real time).
mod common;

use std::sync::Arc;

use cachelock::SharedBackend;
use cachelock::backend::memcached::MemcachedBackend;

async fn servers() -> SharedBackend {
    let urls = common::server_env("CACHELOCK_TEST_MEMCACHED_URLS");
    let b = MemcachedBackend::connect(&urls)
        .await
        .expect("connect to the test memcacheds");
    Arc::new(b)
}

mod values {
    use super::common;
    use crate::memoize_tests;
    memoize_tests!(super::servers().await, paused = false, #[ignore = "needs the test servers: scripts/test"]);
}

mod freshness {
    use super::common;
    use crate::freshness_tests;
    freshness_tests!(super::servers().await, paused = false, #[ignore = "needs the test servers: scripts/test"]);
}

mod streams {
    use super::common;
    use crate::memoize_stream_tests;
    memoize_stream_tests!(super::servers().await, paused = false, #[ignore = "needs the test servers: scripts/test"]);
}

/// 4 processes x 16 callers on one cold key: one compute, every caller
/// served soon after it (see `common::stampede`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the test servers: scripts/test"]
async fn stampede_across_processes_computes_once() {
    common::stampede::run("stampede_worker", servers().await).await;
}

/// One worker process of the stampede test; does nothing when run as a
/// normal test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a worker process of stampede_across_processes_computes_once"]
async fn stampede_worker() {
    if common::stampede::is_worker() {
        common::stampede::worker(servers().await).await;
    }
}

/// Issue 11: 16 processes on one cold key, a compute three times the memoize
/// lock's lease: the lease is kept alive while the compute runs, so it runs
/// exactly once (without keep-alive a waiter takes the expired lock and
/// computes again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the test servers: scripts/test"]
async fn compute_longer_than_the_lease_runs_once_across_16_processes() {
    let p = common::stampede::Params {
        procs: 16,
        tasks: 4,
        compute: std::time::Duration::from_millis(3_000),
        lease: Some(std::time::Duration::from_millis(1_000)),
        slack: std::time::Duration::from_millis(1_000),
    };
    common::stampede::run_with("stampede_worker", servers().await, p).await;
}
