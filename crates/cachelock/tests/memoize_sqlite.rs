//! The memoize and memoize_stream cases on the embedded SQLite backend, in
//! real time (it expires entries by the wall clock).
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]
mod common;

use std::sync::Arc;

use cachelock::{SharedBackend, SqliteBackend};

/// A fresh cache file in a temp dir kept for the whole test binary.
async fn fresh() -> SharedBackend {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let name = common::unique_key("db").replace(':', "-") + ".sqlite3";
    Arc::new(SqliteBackend::open(dir.path().join(name)).await.unwrap())
}

mod values {
    use super::common;
    use crate::memoize_tests;
    memoize_tests!(super::fresh().await, paused = false);
}

mod freshness {
    use super::common;
    use crate::freshness_tests;
    freshness_tests!(super::fresh().await, paused = false);
}

mod streams {
    use super::common;
    use crate::memoize_stream_tests;
    memoize_stream_tests!(super::fresh().await, paused = false);
}
