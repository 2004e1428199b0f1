//! The conformance suite on the embedded in-memory backend, on paused time.
mod common;

use std::sync::Arc;

conformance_tests!(
    Arc::new(cachelock::MemoryBackend::new()) as cachelock::SharedBackend,
    paused = true
);
