//! The `bench stampede` worker: T tasks call memoize on one cold key at once.

use cachelock::SharedBackend;
use serde_json::Value;

use crate::bench::WorkerArgs;
use crate::common::Fail;

/// Runs the stampede tasks of one worker and reports each caller's time.
pub async fn stampede_worker(_backend: SharedBackend, _args: &WorkerArgs) -> Result<Value, Fail> {
    Err(Fail::error(
        "bench stampede needs cachelock::memoize, which is not in this build yet",
    ))
}
