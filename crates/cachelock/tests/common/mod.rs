//! Shared test support: test-server discovery and the backend conformance
//! suite, written once and fanned out over every backend by
//! [`conformance_tests!`].
#![allow(dead_code, unused_macros, clippy::unwrap_used)]

pub mod conformance;
pub mod fault_proxy;
pub mod lock_cases;
pub mod logs;
#[cfg(all(feature = "redis", feature = "memcached"))]
pub mod rig;
pub mod servers;

use std::sync::atomic::{AtomicU64, Ordering};

/// The value of a test-server variable (written by `scripts/services env`).
///
/// Tests that call this are `#[ignore = "needs the test servers: scripts/test"]`,
/// so they run only when asked for (`scripts/test` passes `--include-ignored`);
/// a missing server then fails the test instead of letting it pass unchecked.
pub fn server_env(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{var} is not set: this test needs the test servers; run it through scripts/test \
             (or `source <(scripts/services env)` after `scripts/services start`)"
        ),
    }
}

/// A key no other test (or earlier run against the same server) uses.
pub fn unique_key(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "cachelock-test:{name}:{pid}:{nanos}:{}",
        N.fetch_add(1, Ordering::Relaxed)
    )
}
pub mod freshness_cases;
pub mod memoize_cases;
pub mod opts;
pub mod stampede;
pub mod stream_cases;
