//! CacheLock on the embedded SQLite backend, in real time (it expires keys
//! by the wall clock).
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]
mod common;

use std::sync::Arc;

use cachelock::{SharedBackend, SqliteBackend};

/// A fresh cache file in a temp dir kept for the whole test binary.
async fn fresh() -> SharedBackend {
    interested_global_subscriber();
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let name = common::unique_key("db").replace(':', "-") + ".sqlite3";
    Arc::new(SqliteBackend::open(dir.path().join(name)).await.unwrap())
}

lock_tests!(Some(fresh().await), paused = false);

/// Works around a race in tracing-core: a callsite first hit on one test
/// thread while another thread is installing its `logs::capture()`
/// dispatcher can cache `Interest::never` and hide the second thread's
/// events (seen as a flaky `acquire_new_lock` here, where the tests take
/// real time). A global subscriber that is interested in everything (and
/// writes nowhere) keeps every callsite's interest above `never`; events
/// still go to each thread's own capture.
fn interested_global_subscriber() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let sink = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(std::io::sink)
            .finish();
        let _ = tracing::subscriber::set_global_default(sink);
    });
}
