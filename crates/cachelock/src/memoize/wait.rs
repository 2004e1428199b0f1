//! Waiting for memoize's lock while polling the value.

use std::future::Future;

use bytes::Bytes;
use tokio::time::Instant;

use super::Ctx;
use super::options::OnLockFailure;
use crate::error::Error;
use crate::lock::{CacheLock, LockGuard, LockOptions};

/// How waiting for the lock ended.
pub(crate) enum LockWait<V> {
    /// We hold the lock, and (if the first attempt took it and its read
    /// worked) the keys read with its add, after it.
    Acquired(LockGuard, Option<Vec<Option<Bytes>>>),
    /// The value appeared while we waited.
    Value(V),
    /// We go on without the lock (already logged).
    Without,
    /// The lock could not be taken and the call says fail.
    Fail(Error),
}

/// How many value polls a waiter makes between two lock attempts.
const POLLS_PER_LOCK_TRY: usize = 3;

/// Waits for the lock, polling `poll` (the value) between attempts unless
/// the call forces an overwrite. The first attempt also reads `read` in
/// the same round trip where the backend can
/// ([`Backend::add_reading`](crate::Backend::add_reading)): if it finds
/// the lock held, `poll` is given what it read (`Some`, one value per key)
/// instead of reading itself (`None`); if it takes the lock, the values
/// come back with the guard.
pub(crate) async fn wait_for_lock<V, P, PF>(
    ctx: &Ctx<'_>,
    lock_options: &LockOptions,
    lock_key: String,
    read: &[&str],
    mut poll: P,
) -> LockWait<V>
where
    P: FnMut(Option<Vec<Option<Bytes>>>) -> PF,
    PF: Future<Output = Option<V>>,
{
    let lock = CacheLock::from_parts(
        ctx.cache.clone(),
        lock_key,
        lock_options.clone(),
        ctx.tasks.clone(),
    );
    let force = ctx.call.force_overwrite;
    let start = Instant::now();
    let deadline = lock_options.max_wait.and_then(|w| start.checked_add(w));
    let timed_out = |now: Instant| deadline.is_some_and(|d| now >= d);
    // A release of the lock (the leader wrote the value, or gave up) wakes
    // the poll at once where the backend notifies; polling stays the safety
    // net. Armed before the first try only where that costs no I/O.
    let mut watch = ctx.cache.watch_release_now(lock.key());
    let (mut attempt, mut found) = lock.try_acquire_reading(read).await;
    loop {
        let err = match attempt {
            Ok(guard) => return LockWait::Acquired(guard, found),
            Err(e) if e.is_held() => {
                if timed_out(Instant::now()) {
                    Some(Error::TimedOut {
                        key: lock.key().to_owned(),
                        waited: start.elapsed(),
                    })
                } else {
                    None
                }
            }
            Err(e) => Some(e),
        };
        if let Some(e) = err {
            if e.is_timed_out() {
                tracing::error!(key = %ctx.key, lock = %lock.key(), error = %e, "Timeout waiting on distributed cache lock");
            } else {
                tracing::error!(key = %ctx.key, lock = %lock.key(), error = %e, "could not take the distributed cache lock");
            }
            return match ctx.call.on_lock_failure {
                OnLockFailure::Fail | OnLockFailure::ServeStale => LockWait::Fail(e),
                OnLockFailure::ComputeAnyway => LockWait::Without,
            };
        }
        // Poll the value often (it is what we wait for); try the lock only
        // every few polls (it frees up without a value only when the
        // holder failed or vanished), to halve the load of waiting.
        let polls = if force { 1 } else { POLLS_PER_LOCK_TRY };
        // What the first attempt read is a poll already made.
        if !force
            && let Some(values) = found.take()
            && let Some(v) = poll(Some(values)).await
        {
            return LockWait::Value(v);
        }
        if watch.is_none() {
            watch = Some(ctx.cache.watch_release(lock.key()).await);
            // A release between the try and the arm is not waited out.
            if !force && let Some(v) = poll(None).await {
                return LockWait::Value(v);
            }
        }
        for _ in 0..polls {
            let mut pause = ctx.config.poll_pause();
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                pause = pause.min(left);
            }
            match watch.as_mut() {
                Some(w) => {
                    tokio::select! {
                        () = w.released() => {}
                        () = tokio::time::sleep(pause) => {}
                    }
                }
                None => tokio::time::sleep(pause).await,
            }
            if !force && let Some(v) = poll(None).await {
                return LockWait::Value(v);
            }
        }
        attempt = lock.try_acquire().await;
    }
}

/// Releases the lock, logging (not returning) a failure.
pub(crate) async fn release(guard: Option<LockGuard>, key: &str) {
    if let Some(guard) = guard {
        match guard.release().await {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(%key, lock = %e.key(), error = %e, "failed to release the memoize lock");
            }
        }
    }
}
