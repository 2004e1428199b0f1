//! memoize_stream on the embedded backend (paused time).
mod common;

use std::sync::Arc;

use cachelock::{MemoryBackend, SharedBackend};

memoize_stream_tests!(
    Some(Arc::new(MemoryBackend::new()) as SharedBackend),
    paused = true
);
