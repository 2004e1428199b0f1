//! The `bench stampede` worker: T tasks call memoize on one cold key at once.

use std::time::Duration;

use cachelock::{Cache, LockOptions, SharedBackend};
use serde_json::{Value, json};

use crate::bench::{WorkerArgs, now_us, sleep_until_us};
use crate::common::Fail;

/// Runs the stampede tasks of one worker and reports, for each caller, the
/// time from the common start to its result.
pub async fn stampede_worker(backend: SharedBackend, args: &WorkerArgs) -> Result<Value, Fail> {
    let mut builder = Cache::builder(backend.clone())
        .namespace("")
        .expiration(Duration::from_secs(600))
        .lock_on_miss(!args.no_lock);
    if !args.no_lock {
        // A lease well past the compute time, so the lock never runs out
        // while the value is being computed.
        let lease = (args.duration * 4).max(Duration::from_secs(30));
        builder = builder.lock(LockOptions::new().lease(lease));
    }
    let cache = builder
        .build()
        .map_err(|e| Fail::error(format!("memoize: {e}")))?;
    sleep_until_us(args.start_us).await;
    let mut tasks = Vec::with_capacity(args.tasks);
    for _ in 0..args.tasks {
        let (backend, cache) = (backend.clone(), cache.clone());
        let (key, counter, compute) = (args.key.clone(), args.counter.clone(), args.duration);
        let start_us = args.start_us;
        tasks.push(tokio::spawn(async move {
            let value: u64 = cache
                .try_get_with(key.as_str(), || async move {
                    backend.incr(&counter, 1).await?;
                    tokio::time::sleep(compute).await;
                    Ok::<u64, cachelock::BackendError>(42)
                })
                .await
                .map_err(|e| Fail::error(format!("memoize: {e}")))?;
            if value != 42 {
                return Err(Fail::error(format!("memoize returned {value}, not 42")));
            }
            Ok(now_us().saturating_sub(start_us) as f64 / 1e6)
        }));
    }
    let mut times = Vec::with_capacity(args.tasks);
    for t in tasks {
        times.push(
            t.await
                .map_err(|e| Fail::error(format!("stampede task: {e}")))??,
        );
    }
    Ok(json!({ "times_s": times }))
}
