//! The memoize and memoize_stream cases against three real Memcached
//! servers (real time).
mod common;

use std::sync::Arc;

use cachelock::SharedBackend;
use cachelock::backend::memcached::MemcachedBackend;

async fn servers() -> Option<SharedBackend> {
    let urls = common::server_env("CACHELOCK_TEST_MEMCACHED_URLS")?;
    let b = MemcachedBackend::connect(&urls)
        .await
        .expect("connect to the test memcacheds");
    Some(Arc::new(b))
}

mod values {
    use super::common;
    use crate::memoize_tests;
    memoize_tests!(super::servers().await, paused = false);
}

mod streams {
    use super::common;
    use crate::memoize_stream_tests;
    memoize_stream_tests!(super::servers().await, paused = false);
}
