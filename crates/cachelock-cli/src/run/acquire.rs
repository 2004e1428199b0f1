//! Waiting for the lock, one attempt at a time, so that a signal never
//! leaves an add unresolved.
//!
//! A signal that arrives between attempts ends the wait at once. A signal
//! that arrives while an attempt's add is on its way to the cache does not
//! drop it (a dropped add may still land and hold the lock for a whole
//! lease): the attempt is driven to its answer for up to
//! [`RESOLVE_LIMIT`], and a lock it took is released before `cachelock`
//! exits. A second signal gives up at once.
//!
//! While waiting, a transient backend failure (unreachable, timed out) after
//! the backend has answered once is retried with backoff until the wait
//! runs out (issue 10, item 8, for the command); `-n` stays one attempt.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cachelock::{CacheLock, LockGuard};
use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::child::Signals;
use crate::common::show_duration;

/// How long an interrupted attempt (or a release on the way out) may take:
/// the Redis client's response timeout.
pub const RESOLVE_LIMIT: Duration = Duration::from_secs(5);

/// The longest pause between attempts while the backend fails.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

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
    // Whether the backend has answered an attempt: a backend that cannot be
    // reached at the first attempt is an error at once (a typo in a URL
    // must not hang a cron job), a blip while waiting is not.
    let mut answered = false;
    let mut backoff = retry;
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
                answered = true;
                backoff = retry;
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
            // A transient failure while waiting: retry with backoff while
            // the wait lasts; the error ends the wait when it has run out.
            Err(e) if e.is_unavailable() && answered && !no_wait => {
                let left = until.map(|u| u.saturating_duration_since(Instant::now()));
                if left.is_some_and(|l| l.is_zero()) {
                    return Acquired::Failed(e);
                }
                let pause = left.map_or(backoff, |l| backoff.min(l));
                eprintln!(
                    "cachelock: warning: {}; still waiting for lock {}, next try in {}",
                    crate::common::one_line(&e.to_string()),
                    lock.key(),
                    show_duration(pause)
                );
                backoff = (backoff * 2).min(MAX_BACKOFF);
                pause
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
