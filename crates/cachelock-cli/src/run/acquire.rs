//! Waiting for the lock, one attempt at a time, so that a signal never
//! leaves an add unresolved.
//!
//! A signal that arrives between attempts ends the wait at once. A signal
//! that arrives while an attempt's add is on its way to the cache does not
//! drop it (a dropped add may still land and hold the lock for a whole
//! lease): the attempt is driven to its answer for up to
//! [`RESOLVE_LIMIT`], and a lock it took is released before `cachelock`
//! exits. A second signal gives up at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cachelock::{CacheLock, LockGuard};
use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::child::Signals;
use crate::common::show_duration;

/// How long an interrupted attempt (or a release on the way out) may take:
/// the Redis client's response timeout.
pub const RESOLVE_LIMIT: Duration = Duration::from_secs(5);

/// How the wait ended.
pub enum Acquired {
    /// The lock is ours, after waiting this long.
    Guard(LockGuard, Duration),
    /// Not obtained: held (`-n`) or `-w` ran out; the message says which.
    Conflict(String),
    /// A signal ended the wait; nothing of ours is left in the cache.
    Signal(Signal),
    /// The backend failed.
    Failed(cachelock::Error),
}

/// Takes `lock`: one attempt if `wait` is zero (`-n`), else attempts until
/// it is free or `wait` (`None`: forever) has passed.
pub async fn acquire(
    lock: &CacheLock,
    wait: Option<Duration>,
    no_wait: bool,
    retry: Duration,
    signals: &mut Signals,
) -> Acquired {
    let start = Instant::now();
    let until = wait.map(|w| start + w);
    loop {
        let attempt = lock.try_acquire();
        tokio::pin!(attempt);
        let result = tokio::select! {
            r = &mut attempt => r,
            sig = signals.recv() => {
                let resolved = tokio::select! {
                    r = tokio::time::timeout(RESOLVE_LIMIT, &mut attempt) => r.ok(),
                    _ = signals.recv() => None,
                };
                if let Some(Ok(guard)) = resolved {
                    let _ = tokio::time::timeout(RESOLVE_LIMIT, guard.release()).await;
                }
                return Acquired::Signal(sig);
            }
        };
        let pause = match result {
            Ok(guard) => return Acquired::Guard(guard, start.elapsed()),
            Err(e) if e.is_held() => {
                if no_wait {
                    return Acquired::Conflict(format!(
                        "lock {} is held by someone else",
                        lock.key()
                    ));
                }
                let pause = retry + jitter(retry);
                match until {
                    None => pause,
                    Some(until) => {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Acquired::Conflict(format!(
                                "timed out after {} waiting for lock {}",
                                show_duration(wait.unwrap_or_default()),
                                lock.key()
                            ));
                        }
                        pause.min(left)
                    }
                }
            }
            Err(e) => return Acquired::Failed(e),
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            sig = signals.recv() => return Acquired::Signal(sig),
        }
    }
}

/// Up to 25% of `retry`, so waiters spread out.
fn jitter(retry: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    retry.mul_f64(f64::from(nanos % 1000) / 4000.0)
}
