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

/// Whether `scripts/services` said the test servers are up. When it did, a
/// server test that cannot find its server fails instead of skipping.
pub fn services_promised() -> bool {
    std::env::var("CACHELOCK_TEST_SERVICES").is_ok_and(|v| v == "1")
}

/// The value of a test-server variable, or `None` (with a visible message)
/// when the servers were not started. Panics if `scripts/services` promised
/// servers but this one is missing.
pub fn server_env(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ if services_promised() => {
            panic!(
                "{var} is not set although CACHELOCK_TEST_SERVICES=1 says the test servers are up"
            )
        }
        _ => {
            eprintln!("SKIPPED: {var} is not set; run scripts/test to start the test servers");
            None
        }
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
pub mod memoize_cases;
pub mod opts;
pub mod stampede;
pub mod stream_cases;
