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

use std::future::Future;
use std::time::{Duration, SystemTime};

use rand::RngExt;
use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::backend::{SharedBackend, TokenCheck};
use crate::error::{BackendError, Error, Result};

/// How long an acquire waits for a lock held by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wait {
    /// Try once; a held lock is [`Error::Held`].
    NoWait,
    /// Retry until the lock is free, however long that takes.
    Forever,
    /// Retry until the lock is free or this much time has passed, then
    /// [`Error::TimedOut`].
    Timeout(Duration),
}

/// Settings of a [`CacheLock`]. The defaults are those of the original
/// Djblets `CacheLock`.
#[derive(Debug, Clone, PartialEq)]
pub struct LockOptions {
    lease: Duration,
    retry_interval: Duration,
    jitter: f64,
    wait: Wait,
}

impl Default for LockOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            retry_interval: Duration::from_millis(250),
            jitter: 0.25,
            wait: Wait::Forever,
        }
    }
}

impl LockOptions {
    /// The default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a lock lasts unless extended (the key's TTL). Defaults to 30 s.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The pause between attempts while waiting. Defaults to 250 ms.
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

    /// How [`CacheLock::acquire`] waits. Defaults to [`Wait::Forever`].
    #[must_use]
    pub fn wait(mut self, wait: Wait) -> Self {
        self.wait = wait;
        self
    }

    /// The lease.
    pub fn lease_duration(&self) -> Duration {
        self.lease
    }

    /// The retry interval.
    pub fn retry_duration(&self) -> Duration {
        self.retry_interval
    }

    /// The default wait.
    pub fn default_wait(&self) -> Wait {
        self.wait
    }

    /// Checks the settings: the lease, the retry interval and a timeout must
    /// be positive, and the jitter a fraction between 0 and 1.
    pub fn validate(&self) -> Result<()> {
        if self.lease.is_zero() {
            return Err(Error::InvalidConfig(
                "the lock lease must be positive".into(),
            ));
        }
        if self.retry_interval.is_zero() {
            return Err(Error::InvalidConfig(
                "the retry interval must be positive".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(Error::InvalidConfig(format!(
                "the jitter must be a fraction between 0 and 1, not {}",
                self.jitter
            )));
        }
        if self.wait == Wait::Timeout(Duration::ZERO) {
            return Err(Error::InvalidConfig(
                "the wait timeout must be positive (use Wait::NoWait to try once)".into(),
            ));
        }
        Ok(())
    }
}

/// A distributed lock on one cache key.
///
/// A `CacheLock` is a description of the lock (backend, key, settings); it
/// can be shared and used by many tasks at once. Each successful acquire
/// returns its own [`LockGuard`] with its own token.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> cachelock::Result<()> {
/// use std::sync::Arc;
/// use cachelock::{CacheLock, LockOptions, MemoryBackend};
///
/// let cache = Arc::new(MemoryBackend::new());
/// let lock = CacheLock::new(cache, "example.com:report", LockOptions::default())?;
/// let guard = lock.acquire().await?;
/// // ... the expensive work, done once ...
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct CacheLock {
    backend: SharedBackend,
    key: String,
    options: LockOptions,
}

/// Test that the types users hold across `.await`s can move between threads.
#[allow(dead_code)]
fn bounds(lock: &CacheLock) {
    fn check_send_sync_static<T: Send + Sync + 'static>() {}
    fn check_send<T: Send>(_: &T) {}
    check_send_sync_static::<CacheLock>();
    check_send_sync_static::<LockGuard>();
    check_send(&lock.acquire());
    check_send(&lock.with_lock(|| async {}));
}

impl CacheLock {
    /// A lock on `key`, which is used as given: build it with
    /// [`KeyBuilder`](crate::KeyBuilder).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if and only if the key is empty or the
    /// options fail [`LockOptions::validate`].
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
        Ok(Self {
            backend,
            key,
            options,
        })
    }

    /// The full cache key of the lock.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lock's settings.
    pub fn options(&self) -> &LockOptions {
        &self.options
    }

    /// The backend the lock lives in.
    pub fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// Takes the lock, waiting as the options say.
    ///
    /// # Errors
    ///
    /// * [`Error::Held`] if and only if the wait is [`Wait::NoWait`] and the
    ///   lock is held elsewhere;
    /// * [`Error::TimedOut`] if and only if the wait is a timeout and it
    ///   passed;
    /// * [`Error::Backend`] if the backend failed. If the add's reply was
    ///   lost, the key is read back first: if it holds our token, the lock is
    ///   ours and no error is returned.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe in effect: if the future is dropped while an add is in
    /// flight, a background task deletes our token if the add went through,
    /// so a cancelled acquire does not hold the lock for a whole lease.
    pub async fn acquire(&self) -> Result<LockGuard> {
        self.acquire_with(self.options.wait).await
    }

    /// Tries once, as [`acquire_with`](Self::acquire_with)`(Wait::NoWait)`.
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
        self.acquire_with(Wait::NoWait).await
    }

    /// Waits at most `timeout`, as [`acquire_with`](Self::acquire_with)`(Wait::Timeout(timeout))`.
    ///
    /// # Errors
    ///
    /// [`Error::TimedOut`] if and only if the timeout passed;
    /// [`Error::Backend`] if the backend failed.
    ///
    /// # Cancel safety
    ///
    /// As for [`acquire`](Self::acquire).
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<LockGuard> {
        self.acquire_with(Wait::Timeout(timeout)).await
    }

    /// Takes the lock with a wait given for this call only (the original's
    /// per-call `blocking` and `timeout`). A zero timeout makes one attempt
    /// and then times out.
    ///
    /// Between attempts it sleeps for the retry interval plus random jitter;
    /// the last sleep is cut to the time left, so the wait never overshoots
    /// the timeout by more than one backend round trip.
    ///
    /// # Errors
    ///
    /// As for [`acquire`](Self::acquire), with `wait` in place of the
    /// options' wait.
    ///
    /// # Cancel safety
    ///
    /// As for [`acquire`](Self::acquire).
    pub async fn acquire_with(&self, wait: Wait) -> Result<LockGuard> {
        let start = Instant::now();
        let token = new_token();
        let lease = self.options.lease;
        loop {
            let sent = Instant::now();
            if self.try_add(&token, lease).await? {
                let guard = LockGuard::new(self, token, sent + lease);
                tracing::debug!(
                    key = %self.key,
                    token = %guard.token(),
                    lease = ?lease,
                    estimated_expiry = ?SystemTime::now() + lease,
                    "acquired cache lock"
                );
                return Ok(guard);
            }
            let pause = self.retry_pause();
            let pause = match wait {
                Wait::NoWait => {
                    return Err(Error::Held {
                        key: self.key.clone(),
                    });
                }
                Wait::Forever => pause,
                Wait::Timeout(timeout) => {
                    let waited = start.elapsed();
                    if waited >= timeout {
                        tracing::warn!(key = %self.key, ?timeout, "timed out waiting for cache lock");
                        return Err(Error::TimedOut {
                            key: self.key.clone(),
                            waited,
                        });
                    }
                    pause.min(timeout - waited)
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Runs `work` while holding the lock (taken with the options' wait) and
    /// releases it afterwards, also when `work` panics or the returned
    /// future is dropped (the guard then releases in the background).
    ///
    /// # Errors
    ///
    /// The acquire's errors. A failure to release after `work` finished is
    /// logged, not returned, so `work`'s output is never lost.
    pub async fn with_lock<F, Fut, T>(&self, work: F) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.acquire().await?;
        let out = work().await;
        if let Err(e) = guard.release().await {
            tracing::error!(key = %self.key, error = %e, "failed to release cache lock");
        }
        Ok(out)
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
        retry + retry.mul_f64(jitter)
    }
}

/// A fresh 128-bit random token (a UUID v4 from the OS's CSPRNG).
fn new_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Cleans up an add whose outcome we never learned (the future was dropped
/// mid-flight, or its reply was lost and could not be read back).
struct PendingAdd {
    cleanup: Option<(SharedBackend, String, String, Duration)>,
}

impl PendingAdd {
    fn new(lock: &CacheLock, token: &str, lease: Duration) -> Self {
        Self {
            cleanup: Some((
                lock.backend.clone(),
                lock.key.clone(),
                token.to_owned(),
                lease,
            )),
        }
    }

    fn disarm(&mut self) {
        self.cleanup = None;
    }
}

impl Drop for PendingAdd {
    fn drop(&mut self) {
        let Some((backend, key, token, lease)) = self.cleanup.take() else {
            return;
        };
        if let Ok(handle) = Handle::try_current() {
            handle.spawn(async move {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Released {
    /// The key held our token and was deleted.
    Released,
    /// The local lease deadline had passed, so the cache was not touched:
    /// the lock may already belong to someone else.
    Expired,
    /// The key was gone or held another token: the lease had been lost
    /// (evicted, expired on the server, or the server restarted). Nothing was
    /// deleted.
    Lost,
}

/// Proof of holding a [`CacheLock`]; releases the lock when dropped.
///
/// Prefer [`release`](Self::release), which reports what happened. A guard
/// dropped without release inside a tokio runtime hands the release to a
/// background task; dropped outside any runtime, it logs an error and the
/// lock expires with its lease. `Drop` never blocks and never panics.
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
    deadline: Instant,
    lost: bool,
    armed: bool,
}

impl LockGuard {
    fn new(lock: &CacheLock, token: String, deadline: Instant) -> Self {
        Self {
            backend: lock.backend.clone(),
            key: lock.key.clone(),
            token,
            lease: lock.options.lease,
            deadline,
            lost: false,
            armed: true,
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
        self.deadline
    }

    /// Time left on the lease by the local clock; zero once it has run out.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Whether the lease is known to be gone: the local deadline passed, or
    /// an [`extend`](Self::extend) found the key lost.
    pub fn is_lost(&self) -> bool {
        self.lost || Instant::now() >= self.deadline
    }

    /// Extends the lease to `lease` from now (`None`: the lock's own lease),
    /// only if the key still holds our token.
    ///
    /// # Errors
    ///
    /// * [`Error::LeaseExpired`] if and only if the key is gone or holds
    ///   another token; a `WARN` event is logged and the guard is marked
    ///   lost (release will then delete nothing);
    /// * [`Error::Backend`] if the backend failed; the lease is unchanged.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if dropped, the lease may or may not have been extended,
    /// and the guard keeps the older (earlier) deadline.
    pub async fn extend(&mut self, lease: Option<Duration>) -> Result<()> {
        let lease = lease.unwrap_or(self.lease);
        if lease.is_zero() {
            return Err(Error::InvalidConfig(
                "the lock lease must be positive".into(),
            ));
        }
        let sent = Instant::now();
        match self
            .backend
            .extend_if_eq(&self.key, self.token.as_bytes(), lease)
            .await?
        {
            TokenCheck::Matched => {
                self.deadline = sent + lease;
                self.lost = false;
                tracing::debug!(
                    key = %self.key,
                    token = %self.token,
                    ?lease,
                    estimated_expiry = ?SystemTime::now() + lease,
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
    /// ([`Released::Expired`]). Otherwise one owner-checked delete (one round
    /// trip where the backend has an atomic form) removes the key if it still
    /// holds our token.
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
    deadline: Instant,
) -> std::result::Result<Released, BackendError> {
    if Instant::now() > deadline {
        tracing::debug!(%key, %token, "released cache lock, which already expired from cache");
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
                handle.spawn(async move {
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
