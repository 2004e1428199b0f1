//! A distributed lock kept in the cache.
//!
//! A [`CacheLock`] is taken by an atomic add of a fresh random token under the
//! lock's key, with the lease as the key's TTL. Whoever's add succeeds holds
//! the lock until it releases it or the lease runs out. Release and extend
//! are owner-checked: they act only while the key still holds our token, so a
//! holder whose lease ran out never deletes or extends a lock that someone
//! else took since.
//!
//! # A soft lock
//!
//! A cache may evict a key early or lose it on restart, and then a second
//! holder can get in. Use a cache lock to avoid doing expensive work many
//! times at once (a stampede), not to protect data that breaks if two
//! writers overlap; use fencing tokens or a consensus store for that. When
//! cachelock finds that a lease was lost (on [`LockGuard::extend`] or
//! [`LockGuard::release`]) it says so: the call reports it and a `WARN` event
//! is logged.
//!
//! # Waiting: notified, with a poll as the safety net
//!
//! A waiter arms a release wake-up
//! ([`Backend::watch_release`](crate::Backend::watch_release)) before each
//! attempt after the first, and when the lock is held waits for that
//! wake-up or the retry interval (plus jitter), whichever comes first. Arming
//! before the attempt means a release that happens between the attempt and
//! the wait is not lost. Redis announces each release over pub/sub (one
//! subscriber connection per backend for all its waiters), the embedded
//! backend in process (also waking at the holder's expiry); Memcached and
//! SQLite cannot notify, so their waiters poll with a capped, jittered
//! backoff (an eighth of the retry interval, doubling up to it). A release
//! that is never announced (the holder died and its key expired) costs at
//! most one retry interval, less where the backend knows the holder's
//! expiry. With notification, a waiter sends one attempt per wake-up and
//! at most one per retry interval otherwise.
//!
//! # Fairness: a grace for woken waiters
//!
//! A holder that releases and at once asks for the lock again would win
//! nearly every time (it needs no wake-up), starving the waiters already
//! queued. So a process that released a lock while others waited for it
//! stays out of that lock for [`HANDOFF_GRACE`] after the release; the
//! woken waiters race for it meanwhile, each with the same chance. We chose
//! this over a FIFO queue in the cache: it needs no extra keys, no extra
//! commands and nothing to clean up when a queued waiter dies, costs a
//! releaser that is alone nothing (no one waited, no grace), and under
//! contention gives every worker about the same share (the goal is a
//! min/max share of at least 0.5, not strict order). Its limit: the order
//! among waiters is random, not first come first served.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use rand::RngExt;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::{ReleaseWatch, SharedBackend, TokenCheck};
use crate::error::{BackendError, Error, Result};

/// The longest duration any cachelock setting accepts (lease, wait, retry
/// interval, expiration, poll interval): 365 days. Longer settings are
/// refused with [`Error::InvalidConfig`]; a longer per-call timeout (as
/// given to [`CacheLock::acquire_timeout`]) means "no limit".
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Refuses `d` above [`MAX_DURATION`] (and zero unless `zero_ok`).
pub(crate) fn check_duration(what: &str, d: Duration, zero_ok: bool) -> Result<()> {
    if d.is_zero() && !zero_ok {
        return Err(Error::InvalidConfig(format!("the {what} must be positive")));
    }
    if d > MAX_DURATION {
        return Err(Error::InvalidConfig(format!(
            "the {what} ({d:?}) is longer than the maximum of 365 days"
        )));
    }
    Ok(())
}

/// `at + d`, or `None` if that is too far in the future to represent.
fn later(at: Instant, d: Duration) -> Option<Instant> {
    at.checked_add(d)
}

/// The wall-clock time `d` from now, for logs (`None` if unrepresentable).
fn wall_clock_in(d: Duration) -> Option<SystemTime> {
    SystemTime::now().checked_add(d)
}

/// Settings of a [`CacheLock`]: a builder whose setters consume it; the
/// lock's getters ([`CacheLock::lease`], ...) read them back. The defaults
/// are those of the original Djblets `CacheLock`, waiting without limit.
#[derive(Debug, Clone, PartialEq)]
pub struct LockOptions {
    pub(crate) lease: Duration,
    pub(crate) retry_interval: Duration,
    pub(crate) jitter: f64,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) fail_fast: bool,
}

impl Default for LockOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            retry_interval: Duration::from_millis(250),
            jitter: 0.25,
            max_wait: None,
            fail_fast: false,
        }
    }
}

impl LockOptions {
    /// The default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a lock lasts unless extended (the key's TTL). Defaults to
    /// 30 s. At most [`MAX_DURATION`].
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The longest pause between attempts while waiting: with a backend that
    /// announces releases (Redis, memory) a waiter is woken sooner, and this
    /// is the safety net for a release never announced. Defaults to 250 ms.
    #[must_use]
    pub fn retry_interval(mut self, retry: Duration) -> Self {
        self.retry_interval = retry;
        self
    }

    /// Random extra pause added to each retry, as a fraction of the retry
    /// interval, drawn uniformly from `0..=jitter`, so waiters spread out.
    /// Defaults to 0.25.
    #[must_use]
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// The longest [`CacheLock::acquire`] waits before
    /// [`Error::TimedOut`] (zero: one attempt). Defaults to no limit.
    /// [`CacheLock::try_acquire`] and [`CacheLock::acquire_timeout`] do
    /// not use it.
    #[must_use]
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = Some(wait);
        self
    }

    /// End a wait at the first backend failure instead of retrying it.
    /// Defaults to `false`: while the wait has time left, a backend that is
    /// unavailable or timed out is retried with backoff (logged as `WARN`).
    /// The very first attempt of a wait failing is always an error at once.
    #[must_use]
    pub fn fail_fast(mut self, fail_fast: bool) -> Self {
        self.fail_fast = fail_fast;
        self
    }

    /// Checks the settings: lease, retry interval and wait within
    /// [`MAX_DURATION`], lease and retry interval positive, the jitter a
    /// fraction between 0 and 1.
    pub(crate) fn validate(&self) -> Result<()> {
        check_duration("lock lease", self.lease, false)?;
        check_duration("lock retry interval", self.retry_interval, false)?;
        if let Some(wait) = self.max_wait {
            check_duration("lock wait", wait, true)?;
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(Error::InvalidConfig(format!(
                "the jitter must be a fraction between 0 and 1, not {}",
                self.jitter
            )));
        }
        Ok(())
    }
}

/// Background work (releases of dropped guards, clean-ups of interrupted
/// adds) spawned for a [`Cache`](crate::Cache) or a [`CacheLock`], so that
/// `close()` can wait for it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tasks(Arc<TasksInner>);

#[derive(Debug, Default)]
struct TasksInner {
    running: AtomicUsize,
    idle: Notify,
}

/// Decrements the count when the task ends or is dropped unfinished.
struct TaskDone(Arc<TasksInner>);

impl Drop for TaskDone {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tasks {
    /// Spawns `fut` on `handle`, counted until it ends.
    pub(crate) fn spawn<F>(&self, handle: &Handle, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.0.running.fetch_add(1, Ordering::AcqRel);
        let done = TaskDone(self.0.clone());
        handle.spawn(async move {
            let _done = done;
            fut.await;
        });
    }

    /// How many are still running.
    pub(crate) fn running(&self) -> usize {
        self.0.running.load(Ordering::Acquire)
    }

    /// Waits until none is running, or `timeout` passed. True if none is.
    pub(crate) async fn wait(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.0.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if self.running() == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// How long `close()` waits for background work: 5 s.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A distributed lock on one cache key.
///
/// A `CacheLock` is a description of the lock (backend, key, settings); it
/// can be shared and used by many tasks at once. Each successful acquire
/// returns its own [`LockGuard`] with its own token. Get one from
/// [`Cache::lock`](crate::Cache::lock), or, without a handle, from
/// [`CacheLock::new`].
///
/// The method decides whether it waits, as in `tokio::sync::Mutex`:
/// [`acquire`](Self::acquire) waits (up to the lock's
/// [`max_wait`](LockOptions::max_wait), if any),
/// [`try_acquire`](Self::try_acquire) makes one attempt, and
/// [`acquire_timeout`](Self::acquire_timeout) waits at most the time given.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> cachelock::Result<()> {
/// use cachelock::{Cache, MemoryBackend};
///
/// let cache = Cache::builder(MemoryBackend::new()).build()?;
/// let lock = cache.lock("report");
/// let guard = lock.acquire().await?;
/// // ... the expensive work, done once ...
/// let _ = guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct CacheLock {
    backend: SharedBackend,
    key: String,
    options: LockOptions,
    tasks: Tasks,
}

/// Test that the types users hold across `.await`s can move between threads.
#[allow(dead_code)]
fn bounds(lock: &CacheLock) {
    fn check_send_sync_static<T: Send + Sync + 'static>() {}
    fn check_send<T: Send>(_: &T) {}
    check_send_sync_static::<CacheLock>();
    check_send_sync_static::<LockGuard>();
    check_send(&lock.acquire());
    check_send(&lock.try_acquire());
    check_send(&lock.with_lock(|| async {}));
}

/// When a wait ends.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// One attempt: a held lock is [`Error::Held`].
    Once,
    /// Until this instant ([`Error::TimedOut`] after it); `None`: never.
    Deadline(Option<Instant>),
}

impl CacheLock {
    /// A lock on `key`, which is used as given (build it with
    /// [`KeyBuilder`](crate::KeyBuilder)), for lock-only users; with a
    /// [`Cache`](crate::Cache) use [`Cache::lock`](crate::Cache::lock).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if and only if the key is empty or the
    /// options are out of range (see [`LockOptions`]).
    pub fn new(
        backend: SharedBackend,
        key: impl Into<String>,
        options: LockOptions,
    ) -> Result<Self> {
        let key = key.into();
        if key.is_empty() {
            return Err(Error::InvalidConfig(
                "a cache key for the lock must be provided".into(),
            ));
        }
        options.validate()?;
        Ok(Self::from_parts(backend, key, options, Tasks::default()))
    }

    /// A lock with already validated options.
    pub(crate) fn from_parts(
        backend: SharedBackend,
        key: String,
        options: LockOptions,
        tasks: Tasks,
    ) -> Self {
        Self {
            backend,
            key,
            options,
            tasks,
        }
    }

    /// The full cache key of the lock.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease a new guard gets.
    pub fn lease(&self) -> Duration {
        self.options.lease
    }

    /// The pause between attempts while waiting (before jitter).
    pub fn retry_interval(&self) -> Duration {
        self.options.retry_interval
    }

    /// The longest [`acquire`](Self::acquire) waits; `None`: no limit.
    pub fn max_wait(&self) -> Option<Duration> {
        self.options.max_wait
    }

    /// The backend the lock lives in.
    pub fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// Takes the lock, waiting while someone else holds it: without limit,
    /// or up to the lock's [`max_wait`](LockOptions::max_wait).
    ///
    /// Between attempts it waits for a release notice or the retry interval
    /// plus random jitter (see the module docs: waiting, fairness); the last
    /// wait is cut to the time left, so the wait never overshoots
    /// by more than one backend round trip. While time is left, a backend
    /// that is unavailable or timed out is retried with backoff and a
    /// `WARN` event (unless [`fail_fast`](LockOptions::fail_fast)); the very
    /// first attempt failing is an error at once (a wrong address must not
    /// hang the caller).
    ///
    /// # Errors
    ///
    /// * [`Error::TimedOut`] if and only if a `max_wait` is set and it passed;
    /// * [`Error::Backend`] if the first attempt failed, if the backend
    ///   failed for another reason than being unavailable, or if it was
    ///   still unavailable when the wait ended. If the add's reply was lost,
    ///   the key is read back first: if it holds our token, the lock is ours
    ///   and no error is returned.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe in effect: if the future is dropped while an add is in
    /// flight, a background task (which `close()` waits for) deletes our
    /// token if the add went through, so a cancelled acquire does not hold
    /// the lock for a whole lease.
    pub async fn acquire(&self) -> Result<LockGuard> {
        let until = match self.options.max_wait {
            Some(wait) => Until::Deadline(later(Instant::now(), wait)),
            None => Until::Deadline(None),
        };
        self.acquire_until(until).await
    }

    /// Makes one attempt.
    ///
    /// # Errors
    ///
    /// [`Error::Held`] if and only if someone else holds the lock;
    /// [`Error::Backend`] if the backend failed.
    ///
    /// # Cancel safety
    ///
    /// As for [`acquire`](Self::acquire).
    pub async fn try_acquire(&self) -> Result<LockGuard> {
        self.acquire_until(Until::Once).await
    }

    /// Waits at most `timeout` (zero: one attempt, then
    /// [`Error::TimedOut`]), whatever the lock's `max_wait`. A timeout too
    /// long to represent waits without limit.
    ///
    /// # Errors
    ///
    /// [`Error::TimedOut`] if and only if the timeout passed;
    /// [`Error::Backend`] as for [`acquire`](Self::acquire).
    ///
    /// # Cancel safety
    ///
    /// As for [`acquire`](Self::acquire).
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<LockGuard> {
        self.acquire_until(Until::Deadline(later(Instant::now(), timeout)))
            .await
    }

    async fn acquire_until(&self, until: Until) -> Result<LockGuard> {
        let start = Instant::now();
        let token = new_token();
        let lease = self.options.lease;
        let mut attempts: u32 = 0;
        let mut failures: u32 = 0;
        let mut held: u32 = 0;
        // Armed before every attempt but the first (see `wait_for_release`).
        let mut watch: Option<ReleaseWatch> = None;
        if let Until::Deadline(deadline) = until {
            self.handoff_grace(deadline).await;
        }
        loop {
            let sent = Instant::now();
            attempts = attempts.saturating_add(1);
            let outcome = self.try_add(&token, lease).await;
            let pause = match outcome {
                Ok(true) => {
                    let guard = LockGuard::new(self, token, sent);
                    tracing::debug!(
                        key = %self.key,
                        token = %guard.token(),
                        lease = ?lease,
                        estimated_expiry = ?wall_clock_in(lease),
                        "acquired cache lock"
                    );
                    return Ok(guard);
                }
                Ok(false) => {
                    failures = 0;
                    held = held.saturating_add(1);
                    self.poll_pause(held, watch.as_ref().is_some_and(ReleaseWatch::is_notified))
                }
                Err(e) => {
                    let retry = attempts > 1
                        && e.is_unavailable()
                        && !self.options.fail_fast
                        && matches!(until, Until::Deadline(d) if d.is_none_or(|d| Instant::now() < d));
                    if !retry {
                        return Err(e);
                    }
                    failures = failures.saturating_add(1);
                    let pause = self.backoff(failures);
                    tracing::warn!(
                        key = %self.key,
                        error = %e,
                        retry_in = ?pause,
                        "backend failed while waiting for the cache lock; retrying"
                    );
                    pause
                }
            };
            let pause = match until {
                Until::Once => {
                    return Err(Error::Held {
                        key: self.key.clone(),
                    });
                }
                Until::Deadline(None) => pause,
                Until::Deadline(Some(deadline)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        let waited = start.elapsed();
                        tracing::warn!(key = %self.key, ?waited, "timed out waiting for cache lock");
                        return Err(Error::TimedOut {
                            key: self.key.clone(),
                            waited,
                        });
                    }
                    pause.min(deadline - now)
                }
            };
            match watch.as_mut() {
                // The first attempt failed: arm, then try again at once, so
                // that a release before the arm is not waited out.
                None => {}
                Some(armed) => wait_for_release(armed, pause).await,
            }
            watch = Some(self.backend.watch_release(&self.key).await);
        }
    }

    /// The fairness grace: if this process just released this lock while
    /// others were waiting for it, it waits [`HANDOFF_GRACE`] from that
    /// release before trying again, so that the woken waiters (already
    /// queued) get it first instead of the releaser re-taking it at once.
    /// Never past the wait's `deadline`.
    async fn handoff_grace(&self, deadline: Option<Instant>) {
        let Some(at) = self.backend.handed_off_at(&self.key) else {
            return;
        };
        let end = at + HANDOFF_GRACE;
        let end = deadline.map_or(end, |d| d.min(end));
        if end > Instant::now() {
            tokio::time::sleep_until(end).await;
        }
    }

    /// The pause after the `held`th attempt in a row that found the lock
    /// held. With a notifying backend it is the retry interval plus jitter
    /// (a safety net: a release wakes the waiter at once); a polling backend
    /// starts at an eighth of the retry interval and doubles up to it
    /// (capped, jittered backoff), so a short hold is not waited out.
    fn poll_pause(&self, held: u32, notified: bool) -> Duration {
        if notified {
            return self.retry_pause();
        }
        let factor = 1u32 << held.saturating_sub(1).min(3);
        let full = self.retry_pause();
        (full / 8).saturating_mul(factor).min(full)
    }

    /// Runs `work` while holding the lock (taken as by
    /// [`acquire`](Self::acquire)) and releases it afterwards, also when
    /// `work` panics or the returned future is dropped (the guard then
    /// releases in the background).
    ///
    /// The [`Outcome`] carries `work`'s output and what the release found,
    /// so a lease that ran out during `work` is not silent.
    ///
    /// # Errors
    ///
    /// The acquire's errors; `work` did not run.
    ///
    /// # Cancel safety
    ///
    /// As for [`acquire`](Self::acquire); once `work` runs, dropping the
    /// future drops the guard, which releases in the background.
    pub async fn with_lock<F, Fut, T>(&self, work: F) -> Result<Outcome<T>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.acquire().await?;
        let value = work().await;
        let released = guard.release().await;
        if let Err(e) = &released {
            tracing::error!(key = %self.key, error = %e, "failed to release cache lock");
        }
        Ok(Outcome { value, released })
    }

    /// Waits (at most [`CLOSE_TIMEOUT`]) for the background work of this
    /// lock and its guards: releases of dropped guards and the clean-up of
    /// interrupted acquires. Call it before the process exits. Returns
    /// whether all of it finished.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the work goes on in the background.
    pub async fn close(&self) -> bool {
        self.tasks.wait(CLOSE_TIMEOUT).await
    }

    /// One atomic add of `token`. A lost reply is resolved by reading the
    /// key back; an add that may have gone through is cleaned up in the
    /// background if this future is dropped or the read-back fails.
    async fn try_add(&self, token: &str, lease: Duration) -> Result<bool> {
        let mut pending = PendingAdd::new(self, token, lease);
        let result = self.backend.add(&self.key, token.as_bytes(), lease).await;
        let added = match result {
            Ok(added) => added,
            // The add may or may not have happened: read the key back. Ours:
            // the lock is ours. Someone else's: it is held. Absent: the add
            // did not happen (or our lock is already gone), so the failure
            // is the backend's, not "held".
            Err(e) if e.is_unavailable() => match self.backend.get(&self.key).await {
                Ok(Some(v)) if v.as_ref() == token.as_bytes() => true,
                Ok(Some(_)) => false,
                Ok(None) | Err(_) => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        };
        pending.disarm();
        Ok(added)
    }

    fn retry_pause(&self) -> Duration {
        let retry = self.options.retry_interval;
        let jitter = if self.options.jitter > 0.0 {
            rand::rng().random_range(0.0..=self.options.jitter)
        } else {
            0.0
        };
        retry.saturating_add(
            Duration::try_from_secs_f64(retry.as_secs_f64() * jitter).unwrap_or_default(),
        )
    }

    /// The pause after the `n`th backend failure in a row: the retry pause
    /// doubled each time, at most 5 s (or the retry interval if longer).
    fn backoff(&self, n: u32) -> Duration {
        let cap = Duration::from_secs(5).max(self.options.retry_interval);
        let factor = 1u32 << n.saturating_sub(1).min(16);
        self.retry_pause().saturating_mul(factor).min(cap)
    }
}

/// How long a holder that released a lock to waiting others stays out of
/// it (see the fairness section of the module docs): long enough for a
/// woken waiter in another process to get its add in (a notification and a
/// round trip, with scheduling slack), short enough to cost the releaser
/// little.
pub const HANDOFF_GRACE: Duration = Duration::from_millis(3);

/// Waits for the release `watch` was armed for, or `pause`, whichever comes
/// first. The watch is armed before the attempt that found the lock held,
/// so a release in between completes it at once (no lost wake-up); a
/// release that is never announced costs at most `pause`, or less where the
/// watch knows when the holder's lease runs out.
async fn wait_for_release(watch: &mut ReleaseWatch, pause: Duration) {
    tokio::select! {
        () = watch.released() => {}
        () = tokio::time::sleep(pause) => {}
    }
}

/// A fresh 128-bit random token (a UUID v4 from the OS's CSPRNG).
fn new_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Cleans up an add whose outcome we never learned (the future was dropped
/// mid-flight, or its reply was lost and could not be read back).
struct PendingAdd {
    cleanup: Option<(SharedBackend, String, String, Duration, Tasks)>,
}

impl PendingAdd {
    fn new(lock: &CacheLock, token: &str, lease: Duration) -> Self {
        Self {
            cleanup: Some((
                lock.backend.clone(),
                lock.key.clone(),
                token.to_owned(),
                lease,
                lock.tasks.clone(),
            )),
        }
    }

    fn disarm(&mut self) {
        self.cleanup = None;
    }
}

impl Drop for PendingAdd {
    fn drop(&mut self) {
        let Some((backend, key, token, lease, tasks)) = self.cleanup.take() else {
            return;
        };
        if let Ok(handle) = Handle::try_current() {
            tasks.spawn(&handle, async move {
                if let Ok(TokenCheck::Matched) =
                    backend.delete_if_eq(&key, token.as_bytes(), lease).await
                {
                    tracing::debug!(%key, "removed the lock taken by an interrupted acquire");
                }
            });
        }
    }
}

/// What [`LockGuard::release`] found.
#[must_use = "Expired and Lost mean another holder may have run at the same time"]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Released {
    /// The key held our token and was deleted.
    Released,
    /// The local lease deadline had passed, so the cache was not touched:
    /// the lock may already belong to someone else. Logged as `WARN`.
    Expired,
    /// The key was gone or held another token: the lease had been lost
    /// (evicted, expired on the server, or the server restarted). Nothing was
    /// deleted. Logged as `WARN`.
    Lost,
}

/// What [`CacheLock::with_lock`] returns: the work's output and what the
/// release found.
#[must_use = "check `released`: the lease may have run out during the work"]
#[derive(Debug)]
pub struct Outcome<T> {
    /// The output of the work.
    pub value: T,
    /// What the release found ([`Released::Expired`] or [`Released::Lost`]:
    /// the lease ran out during the work), or why it failed.
    pub released: std::result::Result<Released, BackendError>,
}

impl<T> Outcome<T> {
    /// True if the lock was held to the end (released as
    /// [`Released::Released`]).
    pub fn held_throughout(&self) -> bool {
        matches!(self.released, Ok(Released::Released))
    }

    /// The work's output, whatever the release found.
    pub fn into_value(self) -> T {
        self.value
    }
}

/// Proof of holding a [`CacheLock`]; releases the lock when dropped.
///
/// Prefer [`release`](Self::release), which reports what happened. A guard
/// dropped without release inside a tokio runtime hands the release to a
/// background task (which `close()` waits for); dropped outside any
/// runtime, it logs an error and the lock expires with its lease. `Drop`
/// never blocks and never panics.
///
/// A guard is released at most once, which the type system enforces:
///
/// ```compile_fail
/// # async fn f(lock: cachelock::CacheLock) {
/// let guard = lock.acquire().await.unwrap();
/// let _ = guard.release().await;
/// let _ = guard.release().await; // error: use of moved value
/// # }
/// ```
#[must_use = "the lock is released as soon as the guard is dropped"]
#[clippy::has_significant_drop]
#[derive(Debug)]
pub struct LockGuard {
    backend: SharedBackend,
    key: String,
    token: String,
    lease: Duration,
    /// `None`: too far in the future to represent (never, in practice).
    deadline: Option<Instant>,
    lost: bool,
    armed: bool,
    tasks: Tasks,
}

impl LockGuard {
    fn new(lock: &CacheLock, token: String, sent: Instant) -> Self {
        Self {
            backend: lock.backend.clone(),
            key: lock.key.clone(),
            token,
            lease: lock.options.lease,
            deadline: later(sent, lock.options.lease),
            lost: false,
            armed: true,
            tasks: lock.tasks.clone(),
        }
    }

    /// The full cache key of the lock.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The random token stored under the key while we hold the lock.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// When the lease runs out by the local clock (measured from before the
    /// add or extend was sent, so it never runs later than the server's).
    pub fn deadline(&self) -> Instant {
        // A lease is at most MAX_DURATION, so this is always set in practice.
        self.deadline
            .unwrap_or_else(|| Instant::now() + MAX_DURATION)
    }

    /// Time left on the lease by the local clock; zero once it has run out.
    pub fn remaining(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// Whether the lease is known to be gone: the local deadline passed, or
    /// an [`extend`](Self::extend) found the key lost.
    pub fn is_lost(&self) -> bool {
        self.lost || self.past_deadline()
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Extends the lease to `lease` from now (`None`: the lock's own lease),
    /// only if the key still holds our token. Past the local lease
    /// deadline the cache is not touched: the lease is gone.
    ///
    /// # Errors
    ///
    /// * [`Error::LeaseExpired`] if and only if the local deadline passed,
    ///   or the key is gone or holds another token; a `WARN` event is logged
    ///   and the guard is marked lost (release will then delete nothing);
    /// * [`Error::InvalidConfig`] if `lease` is zero or over
    ///   [`MAX_DURATION`]; nothing was sent;
    /// * [`Error::Backend`] if the backend failed; the lease is unchanged.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if dropped, the lease may or may not have been extended,
    /// and the guard keeps the older (earlier) deadline.
    pub async fn extend(&mut self, lease: Option<Duration>) -> Result<()> {
        let lease = lease.unwrap_or(self.lease);
        check_duration("lock lease", lease, false)?;
        if self.past_deadline() {
            self.lost = true;
            tracing::warn!(
                key = %self.key,
                "cache lock lease ran out before it was extended; the lock is no longer valid"
            );
            return Err(Error::LeaseExpired {
                key: self.key.clone(),
            });
        }
        let sent = Instant::now();
        match self
            .backend
            .extend_if_eq(&self.key, self.token.as_bytes(), lease)
            .await?
        {
            TokenCheck::Matched => {
                self.deadline = later(sent, lease);
                self.lost = false;
                tracing::debug!(
                    key = %self.key,
                    token = %self.token,
                    ?lease,
                    estimated_expiry = ?wall_clock_in(lease),
                    "extended cache lock"
                );
                Ok(())
            }
            TokenCheck::Mismatch | TokenCheck::Missing => {
                self.lost = true;
                tracing::warn!(
                    key = %self.key,
                    "cache lock fell out of cache; the lock is no longer valid"
                );
                Err(Error::LeaseExpired {
                    key: self.key.clone(),
                })
            }
        }
    }

    /// Releases the lock and reports what was found.
    ///
    /// Past the local lease deadline, the cache is not touched at all
    /// ([`Released::Expired`], logged as `WARN`). Otherwise one
    /// owner-checked delete (one round trip where the backend has an atomic
    /// form) removes the key if it still holds our token.
    ///
    /// # Errors
    ///
    /// [`BackendError`] if and only if the backend failed; the key then
    /// expires with its lease.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the release is handed to a background task,
    /// as when the guard is dropped.
    pub async fn release(mut self) -> std::result::Result<Released, BackendError> {
        let outcome = release_now(
            &self.backend,
            &self.key,
            &self.token,
            self.lease,
            self.deadline,
        )
        .await;
        self.armed = false;
        outcome
    }

    /// Gives the guard up without releasing: the key stays until its lease
    /// runs out.
    pub fn forget(mut self) {
        self.armed = false;
    }
}

async fn release_now(
    backend: &SharedBackend,
    key: &str,
    token: &str,
    lease: Duration,
    deadline: Option<Instant>,
) -> std::result::Result<Released, BackendError> {
    if deadline.is_some_and(|d| Instant::now() >= d) {
        tracing::warn!(
            %key,
            "cache lock lease ran out before release; another holder may have run meanwhile; \
             nothing was deleted"
        );
        return Ok(Released::Expired);
    }
    match backend.delete_if_eq(key, token.as_bytes(), lease).await? {
        TokenCheck::Matched => {
            tracing::debug!(%key, %token, "released cache lock");
            Ok(Released::Released)
        }
        check => {
            tracing::warn!(
                %key,
                found = if check == TokenCheck::Missing { "nothing" } else { "another token" },
                "cache lock was lost before release; nothing was deleted"
            );
            Ok(Released::Lost)
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match Handle::try_current() {
            Ok(handle) => {
                let backend = self.backend.clone();
                let key = std::mem::take(&mut self.key);
                let token = std::mem::take(&mut self.token);
                let (lease, deadline) = (self.lease, self.deadline);
                tracing::debug!(%key, "cache lock guard dropped; releasing in the background");
                self.tasks.spawn(&handle, async move {
                    if let Err(e) = release_now(&backend, &key, &token, lease, deadline).await {
                        tracing::error!(%key, error = %e, "background release of cache lock failed");
                    }
                });
            }
            Err(_) => tracing::error!(
                key = %self.key,
                "cache lock guard dropped without release and with no runtime to release it; \
                 the lock stays until its lease runs out"
            ),
        }
    }
}
