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
//! # Keep-alive, the loss signal and the safety margin
//!
//! * The holder trusts its lease until `lease − margin` after the add was
//!   sent ([`LockOptions::safety_margin`], default 1 % of the lease); the
//!   server's TTL is the whole lease.
//! * [`LockGuard::keep_alive`] renews the lease in the background
//!   (owner-checked, every third of the lease) until release, drop, loss or
//!   [`LockOptions::max_hold`]; no renewal is sent after the release began.
//! * [`LockGuard::lost`] gives a [`Lost`] future that completes when the
//!   lease is known lost or its deadline passed without a renewal.
//!   [`CacheLock::with_lock`] keeps the lease alive and passes it to the
//!   closure.
//!
//! None of these makes the lock hard: an evicted key is found at the next
//! renewal, not prevented, and a process paused past its margin can still
//! overlap with the next holder.
//!
//! # Metrics and spans
//!
//! Counters and histograms go to the [`metrics`] facade (names in
//! [`metrics_names`]); spans `cachelock.acquire`, `cachelock.hold` and
//! `cachelock.release` carry the key. The token is logged only at `DEBUG`.
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
//! expiry. With notification, a waiter sends at most one attempt per retry
//! interval, and none when the lock is handed to it (see below).
//!
//! # Fairness: first come, first served on Redis; a grace elsewhere
//!
//! A holder that releases and at once asks for the lock again would win
//! nearly every time (it needs no wake-up), and among woken waiters the
//! first one the server notifies would win (Redis delivers a message to its
//! subscribers in the order they subscribed), starving the others. On a
//! standalone Redis the lock therefore keeps a **wait queue** beside the
//! key: a waiter whose attempt finds the lock held joins the end of the
//! line in the same script (no extra command), with its lease. A release
//! does not free the lock but **hands it straight to the first waiter in
//! line**, in the release script: it stores that waiter's value with a
//! short TTL, the *claim* (the waiter's lease or
//! [`HANDOFF_CLAIM`], 1 s, whichever is shorter),
//! numbers the grant (fence), and names the waiter and the fence in its
//! notice. The named waiter holds the lock from then on: on the notice it
//! builds its guard without waiting for a round trip, and extends the
//! claim to its lease in the background a third of the claim in (unless
//! it released the lock before: a short hold sends nothing more), retried
//! quickly while the claim lasts; if that fails the lease is lost and
//! [`LockGuard::lost`] says so. So the hand-off costs one round trip less,
//! and the releaser's next acquisition can start at once. The others go
//! on waiting without sending anything.
//! Because the lock never comes free while someone waits, the order holds
//! against the releaser and against newcomers.
//!
//! * The guard of a handed-off lock counts its lease from the send time of
//!   the waiter's last attempt that found the lock held: the server's grant
//!   came after that attempt ran, so the guard's deadline is never later
//!   than the server's TTL. That costs at most the time since that attempt
//!   (one poll interval); the safety margin applies as usual. The attempt's
//!   reply carries the fence of the latest grant, and a notice whose fence
//!   is not above it (older than the attempt) is not trusted; nor is one
//!   more than half the claim after the attempt: the next attempt then
//!   settles it. Until the extension lands the guard is valid for the
//!   claim from that attempt ([`LockGuard::remaining`] says so).
//! * A notice that never arrives (the subscriber connection dropped, a
//!   message lost) costs the waiter at most one poll interval: its next
//!   attempt finds the lock holding its own value, which is a grant (with
//!   the hand-off's fence, the lease counted from that attempt).
//! * A waiter that stops waiting (timeout, error, cancellation) leaves the
//!   line in the background, and if a release handed it the lock just
//!   then, gives it up to the next in line
//!   ([`Backend::leave_queue`](crate::Backend::leave_queue)). A waiter
//!   whose process **crashed** while in line is handed the lock when its
//!   turn comes, and holds it for the claim only (it never extends it);
//!   the next waiter gets it within one poll interval after that.
//! * A waiter in line that also polls keeps its place.
//!
//! Where there is no queue (Redis Cluster, a Redis with a native
//! compare-and-delete, the embedded backend), a process that released a
//! lock while others waited for it stays out of that lock for
//! [`HANDOFF_GRACE`] after the release, and the woken waiters race for it
//! meanwhile; Memcached and SQLite waiters poll with jitter.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rand::RngExt;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::{
    Grant, HANDOFF_CLAIM, LockAdd, Queued, ReleaseWatch, SharedBackend, TokenCheck, ValueFormat,
    Version,
};
use crate::error::{BackendError, Error, Result};
use crate::holder::{self, Holder};

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

/// Which other lock implementation a lock is shared with, on the same
/// server and key. Only the stored value changes; build the key to match
/// as well (for Django, [`KeyBuilder::django`](crate::KeyBuilder::django)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Compat {
    /// cachelock's own format: the token's bytes.
    #[default]
    Native,
    /// djblets' `CacheLock` on a Django cache: the token is stored as
    /// Django stores a `str` ([`ValueFormat::DjangoStr`]: pickled on Redis,
    /// text with flags 16 on Memcached), so that `cache.get` in Django reads
    /// it and each side's owner-checked release leaves the other's lock
    /// alone.
    Django,
}

impl Compat {
    /// The value format the backend is asked for.
    pub fn value_format(self) -> ValueFormat {
        match self {
            Compat::Native => ValueFormat::Raw,
            Compat::Django => ValueFormat::DjangoStr,
        }
    }
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
    pub(crate) safety_margin: Option<Duration>,
    pub(crate) max_hold: Option<Duration>,
    pub(crate) compat: Compat,
    pub(crate) command: Option<String>,
}

impl Default for LockOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            retry_interval: Duration::from_millis(250),
            jitter: 0.25,
            max_wait: None,
            fail_fast: false,
            safety_margin: None,
            max_hold: None,
            compat: Compat::Native,
            command: None,
        }
    }
}

impl LockOptions {
    /// The default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whose locks this one must exclude, which decides how the token is
    /// stored (see [`Compat`]). Defaults to [`Compat::Native`].
    #[must_use]
    pub fn compat(mut self, compat: Compat) -> Self {
        self.compat = compat;
        self
    }

    /// The [`Compat`] mode.
    pub fn compat_mode(&self) -> Compat {
        self.compat
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

    /// The safety margin (lock-delay): the holder considers its lease valid
    /// only until `lease − margin` from the moment the add (or extend) was
    /// sent, while the server's TTL is the whole lease. The margin covers
    /// the clock drift between this process and the server and the time a
    /// reply takes, so a holder stops trusting its lease before the server
    /// can hand it to someone else. Defaults to 1 % of the lease (the
    /// Redlock drift factor); must be shorter than the lease.
    ///
    /// It is a margin, not a guarantee: a process paused for longer (GC,
    /// swap, a stopped VM) can still run past it.
    #[must_use]
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.safety_margin = Some(margin);
        self
    }

    /// The longest a guard's [keep-alive](LockGuard::keep_alive) renews the
    /// lease, from the acquire. Past it, renewal stops and the lease runs
    /// out on its own (and [`LockGuard::lost`] fires), so a stuck holder
    /// cannot keep the lock for ever. Defaults to no limit.
    #[must_use]
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = Some(max_hold);
        self
    }

    /// The command the holder runs, written into the lock's value next to
    /// the host, pid and start time (see [`Holder`]; cut to 256
    /// characters). Defaults to none. `cachelock run` sets it.
    #[must_use]
    pub fn holder_command(mut self, command: impl Into<String>) -> Self {
        self.command = Some(command.into());
        self
    }

    /// Checks the settings: lease, retry interval and wait within
    /// [`MAX_DURATION`], lease and retry interval positive, the jitter a
    /// fraction between 0 and 1, the safety margin shorter than the lease.
    pub(crate) fn validate(&self) -> Result<()> {
        check_duration("lock lease", self.lease, false)?;
        check_duration("lock retry interval", self.retry_interval, false)?;
        if let Some(wait) = self.max_wait {
            check_duration("lock wait", wait, true)?;
        }
        if let Some(hold) = self.max_hold {
            check_duration("lock max hold", hold, false)?;
        }
        if let Some(margin) = self.safety_margin
            && margin >= self.lease
        {
            return Err(Error::InvalidConfig(format!(
                "the lock safety margin ({margin:?}) must be shorter than the lease ({:?})",
                self.lease
            )));
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
/// A `CacheLock` is a description of the lock (backend, key, settings).
/// Each successful acquire returns its own [`LockGuard`] with its own token.
/// While one of its guards is alive, acquiring through the same
/// `CacheLock` (or a clone) is [`Error::AlreadyHeld`] at once, not a wait
/// on ourselves: tasks that should exclude each other each take their own
/// (`cache.lock(key)` is cheap). Get one from
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
    /// Whether a guard of this lock (or of a clone) is alive: acquiring
    /// again is then [`Error::AlreadyHeld`], not a wait on ourselves.
    held: Arc<AtomicBool>,
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
    check_send(&lock.with_lock(|_| async {}));
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
            held: Arc::new(AtomicBool::new(false)),
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
    /// * [`Error::AlreadyHeld`] if and only if a guard of this `CacheLock`
    ///   (or a clone) is alive; nothing is sent;
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
        self.acquire_until(until, &[], &mut None).await
    }

    /// Makes one attempt.
    ///
    /// # Errors
    ///
    /// [`Error::Held`] if and only if someone else holds the lock;
    /// [`Error::AlreadyHeld`] as for [`acquire`](Self::acquire);
    /// [`Error::Backend`] if the backend failed.
    ///
    /// # Cancel safety
    ///
    /// As for [`acquire`](Self::acquire).
    pub async fn try_acquire(&self) -> Result<LockGuard> {
        self.acquire_until(Until::Once, &[], &mut None).await
    }

    /// As [`try_acquire`](Self::try_acquire), and reads `keys` after the
    /// add, in the same round trip where the backend can
    /// ([`Backend::add_reading`](crate::Backend::add_reading)): memoize's
    /// first attempt, which also reads the value. The values (one per key,
    /// in order) are handed back whatever the attempt's outcome, or `None`
    /// if the read failed or was not made (a lost reply that the key was
    /// read back for).
    pub(crate) async fn try_acquire_reading(
        &self,
        keys: &[&str],
    ) -> (Result<LockGuard>, Option<Vec<Option<Bytes>>>) {
        let mut found = None;
        let result = self.acquire_until(Until::Once, keys, &mut found).await;
        (result, found)
    }

    /// Waits at most `timeout` (zero: one attempt, then
    /// [`Error::TimedOut`]), whatever the lock's `max_wait`. A timeout too
    /// long to represent waits without limit.
    ///
    /// # Errors
    ///
    /// [`Error::TimedOut`] if and only if the timeout passed;
    /// [`Error::AlreadyHeld`] and [`Error::Backend`] as for
    /// [`acquire`](Self::acquire).
    ///
    /// # Cancel safety
    ///
    /// As for [`acquire`](Self::acquire).
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<LockGuard> {
        self.acquire_until(
            Until::Deadline(later(Instant::now(), timeout)),
            &[],
            &mut None,
        )
        .await
    }

    /// Who holds the lock now, as its value says (`None`: free). The value
    /// is read as untrusted input: see [`Holder`].
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] if the backend failed.
    pub async fn holder(&self) -> Result<Option<Holder>> {
        Ok(self
            .backend
            .get(&self.key)
            .await?
            .map(|v| match self.options.compat {
                Compat::Native => Holder::parse(&v),
                // Django's format holds the token alone (djblets' or ours).
                Compat::Django => match self
                    .backend
                    .decode_lock_value(&v, self.options.compat.value_format())
                {
                    Some(token) => Holder::parse(token.as_bytes()),
                    None => Holder::parse(&v),
                },
            }))
    }

    /// Takes the lock as `until` says; the first attempt also reads `read`
    /// into `found` (see [`try_acquire_reading`](Self::try_acquire_reading)).
    async fn acquire_until(
        &self,
        until: Until,
        read: &[&str],
        found: &mut Option<Vec<Option<Bytes>>>,
    ) -> Result<LockGuard> {
        let span = tracing::debug_span!("cachelock.acquire", key = %self.key);
        let start = Instant::now();
        let result = self
            .acquire_loop(until, start, read, found)
            .instrument(span)
            .await;
        metrics::histogram!(metrics_names::ACQUIRE_WAIT).record(start.elapsed().as_secs_f64());
        match &result {
            Ok(_) => metrics::counter!(metrics_names::ACQUIRED).increment(1),
            Err(Error::TimedOut { .. }) => metrics::counter!(metrics_names::TIMEOUTS).increment(1),
            Err(_) => {}
        }
        result
    }

    async fn acquire_loop(
        &self,
        until: Until,
        start: Instant,
        mut read: &[&str],
        found: &mut Option<Vec<Option<Bytes>>>,
    ) -> Result<LockGuard> {
        let token = new_token();
        let value = self.lock_value(&token);
        let lease = self.options.lease;
        let mut attempts: u32 = 0;
        let mut failures: u32 = 0;
        let mut held: u32 = 0;
        // A waiter (not a single try) waits in line where the backend keeps
        // a queue; it leaves the line if it stops waiting without the lock.
        // Not in Django mode: djblets does not wait in line, and the
        // queue's scripts store values as they are (Raw).
        let waiting = matches!(until, Until::Deadline(_));
        let queued = waiting && self.options.compat == Compat::Native;
        // Armed before every attempt; before the first only where that
        // costs no I/O (see `wait_for_release`).
        let mut watch: Option<ReleaseWatch> = if waiting {
            self.backend.watch_release_now(&self.key)
        } else {
            None
        };
        let mut in_line = InLine::default();
        // When the last attempt that found the lock held was sent, and the
        // latest grant's fence it saw (see `handoff_base`).
        let mut last_held: Option<(Instant, u64)> = None;
        if let Until::Deadline(deadline) = until {
            self.handoff_grace(deadline).await;
        }
        loop {
            if self.held.load(Ordering::Acquire) {
                return Err(Error::AlreadyHeld {
                    key: self.key.clone(),
                });
            }
            let sent = Instant::now();
            attempts = attempts.saturating_add(1);
            metrics::counter!(metrics_names::ATTEMPTS).increment(1);
            let outcome = self.try_add(&value, lease, queued, read, found).await;
            read = &[];
            let pause = match outcome {
                Ok(Queued::Granted(grant)) => {
                    return Ok(self.granted(&mut in_line, token, &value, sent, grant));
                }
                Ok(Queued::Held { latest_fence }) => {
                    if queued {
                        in_line.join(self, &value, lease);
                    }
                    if let Some(fence) = latest_fence {
                        last_held = Some((sent, fence));
                    }
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
            // The first attempt failed unarmed (no watch): arm, then try
            // again at once, so that a release before the arm is not waited
            // out.
            if let Some(armed) = watch.as_mut()
                && let Some(fence) = wait_for_release(armed, pause, &value).await
                && let Some(sent) = handoff_base(last_held, fence, lease.min(HANDOFF_CLAIM))
            {
                if self.held.load(Ordering::Acquire) {
                    // Still in line: the lock is given up in the background.
                    return Err(Error::AlreadyHeld {
                        key: self.key.clone(),
                    });
                }
                let grant = Grant {
                    fence,
                    version: None,
                };
                let guard = self.granted(&mut in_line, token, &value, sent, grant);
                // The release stored our value for the claim only.
                guard.confirm_claim(sent, lease.min(HANDOFF_CLAIM));
                return Ok(guard);
            }
            // A hand-off to us that `handoff_base` does not vouch for is
            // checked by the next attempt (which finds the lock ours if it
            // is).
            watch = Some(self.backend.watch_release(&self.key).await);
        }
    }

    /// The guard of a grant whose add (or the last attempt before the
    /// hand-off, see [`handoff_base`]) was sent at `sent`.
    fn granted(
        &self,
        in_line: &mut InLine,
        token: String,
        value: &Bytes,
        sent: Instant,
        grant: Grant,
    ) -> LockGuard {
        // The add, or the hand-off, took us out of the line.
        in_line.disarm();
        self.held.store(true, Ordering::Release);
        let guard = LockGuard::new(self, token, value.clone(), sent, grant);
        tracing::debug!(
            key = %self.key,
            token = %guard.token(),
            fence = guard.fence(),
            lease = ?self.options.lease,
            estimated_expiry = ?wall_clock_in(self.options.lease),
            "acquired cache lock"
        );
        guard
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
    /// While `work` runs the lease is kept alive
    /// ([`LockGuard::keep_alive`], bounded by the lock's
    /// [`max_hold`](LockOptions::max_hold)), and `work` is given the guard's
    /// [`Lost`] signal: select on it to abandon the work when the lease is
    /// lost.
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
        F: FnOnce(Lost) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.acquire().await?;
        guard.keep_alive();
        let value = work(guard.lost()).await;
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

    /// The bytes stored under the key for `token`: in cachelock's own
    /// format the token and who holds it (see [`Holder`]); in Django's the
    /// token alone, encoded as Django stores a `str` (the backend says what
    /// that is on its server).
    fn lock_value(&self, token: &str) -> Bytes {
        match self.options.compat {
            Compat::Native => Bytes::from(holder::encode(token, self.options.command.as_deref())),
            Compat::Django => self
                .backend
                .encode_lock_value(token, self.options.compat.value_format()),
        }
    }

    /// One atomic add of `value`, in line if `queued`, numbered with a
    /// fence. A lost reply is resolved by reading the key back (ours: the
    /// lock is ours, with the fence the counter holds now, which no earlier
    /// grant had and every later one exceeds); an add that may have gone
    /// through is cleaned up in the background if this future is dropped or
    /// the read-back fails. With keys to `read`, they are read after the
    /// add ([`Backend::add_reading`](crate::Backend::add_reading)) into
    /// `found`.
    async fn try_add(
        &self,
        value: &Bytes,
        lease: Duration,
        queued: bool,
        read: &[&str],
        found: &mut Option<Vec<Option<Bytes>>>,
    ) -> Result<Queued> {
        let mut pending = PendingAdd::new(self, value, lease, queued);
        let add = if queued {
            LockAdd::Queued
        } else {
            LockAdd::Fenced(self.options.compat.value_format())
        };
        let result = match add {
            _ if !read.is_empty() => self
                .backend
                .add_reading(&self.key, value, lease, add, read)
                .await
                .map(|r| {
                    match r.values {
                        Ok(values) => *found = Some(values),
                        Err(e) => {
                            tracing::debug!(key = %self.key, error = %e, "the read made with the lock's add failed");
                        }
                    }
                    r.outcome
                }),
            LockAdd::Queued => self.backend.add_queued(&self.key, value, lease).await,
            LockAdd::Fenced(format) => self
                .backend
                .add_fenced(&self.key, value, lease, format)
                .await
                .map(Queued::from),
        };
        let granted = match result {
            Ok(granted) => granted,
            // The add may or may not have happened: read the key back. Ours:
            // the lock is ours. Someone else's: it is held. Absent: the add
            // did not happen (or our lock is already gone), so the failure
            // is the backend's, not "held".
            Err(e) if e.is_unavailable() => match self.backend.get(&self.key).await {
                Ok(Some(v)) if v == *value => match self.backend.fence(&self.key).await {
                    Ok(Some(fence)) => Queued::Granted(Grant {
                        fence,
                        version: None,
                    }),
                    _ => return Err(e.into()),
                },
                Ok(Some(_)) => Queued::Held { latest_fence: None },
                Ok(None) | Err(_) => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        };
        pending.disarm();
        Ok(granted)
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
///
/// A release that handed the lock to another waiter in line (the backend's
/// queue, see [`Backend::add_queued`](crate::backend::Backend::add_queued))
/// is not a reason to try: that waiter holds the lock now, so this one
/// waits on, and sends nothing. A release that handed it to us returns the
/// grant's fence: we hold it.
async fn wait_for_release(watch: &mut ReleaseWatch, pause: Duration, ours: &[u8]) -> Option<u64> {
    let until = Instant::now() + pause;
    loop {
        tokio::select! {
            () = watch.released() => {
                if !watch.handed_to_other(ours) {
                    return watch.handed_to_us(ours);
                }
            }
            () = tokio::time::sleep_until(until) => return None,
        }
    }
}

/// Where a lock handed to us by a release (notice with `fence`) starts its
/// lease: the send time of our last attempt that found the lock held in
/// line (`last_held`, with the latest grant's fence it saw), if the hand-off
/// certainly came after that attempt ran on the server (its fence is
/// larger), so that the guard's deadline is never later than the server's
/// TTL (set by the release, after that attempt). `None` (the next attempt
/// settles it) when there is no such attempt, when the notice is older than
/// it (the lock it gave may be gone), or when the attempt was sent more
/// than half the hand-off's claim ago (`claim`, see [`HANDOFF_CLAIM`]: the
/// guard would have too little of it left to extend it in time).
fn handoff_base(last_held: Option<(Instant, u64)>, fence: u64, claim: Duration) -> Option<Instant> {
    let (sent, seen) = last_held?;
    (fence > seen && sent.elapsed() <= claim / 2).then_some(sent)
}

/// Takes a waiter out of its lock's wait queue when its acquire ends
/// without the lock (timed out, failed, or dropped), in the background, so
/// that no release hands the lock to a waiter that is gone; a lock that a
/// release handed it meanwhile is given up to the next in line
/// ([`Backend::leave_queue`](crate::backend::Backend::leave_queue)).
#[derive(Default)]
struct InLine {
    leave: Option<(SharedBackend, String, Bytes, Duration, Tasks)>,
}

impl InLine {
    fn join(&mut self, lock: &CacheLock, value: &Bytes, lease: Duration) {
        if self.leave.is_none() {
            self.leave = Some((
                lock.backend.clone(),
                lock.key.clone(),
                value.clone(),
                lease,
                lock.tasks.clone(),
            ));
        }
    }

    fn disarm(&mut self) {
        self.leave = None;
    }
}

impl Drop for InLine {
    fn drop(&mut self) {
        let Some((backend, key, value, lease, tasks)) = self.leave.take() else {
            return;
        };
        if let Ok(handle) = Handle::try_current() {
            tasks.spawn(&handle, async move {
                if let Err(e) = backend.leave_queue(&key, &value, lease).await {
                    tracing::debug!(%key, error = %e, "could not leave the lock's wait queue");
                }
            });
        }
    }
}

/// A fresh 128-bit random token (a UUID v4 from the OS's CSPRNG).
fn new_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Cleans up an add whose outcome we never learned (the future was dropped
/// mid-flight, or its reply was lost and could not be read back): deletes
/// our value if the add stored it, and for an add in line first leaves the
/// line (the add may have put us in it, and a release may since have
/// handed us the lock).
struct PendingAdd {
    cleanup: Option<(SharedBackend, String, Bytes, Duration, bool, Tasks)>,
}

impl PendingAdd {
    fn new(lock: &CacheLock, value: &Bytes, lease: Duration, queued: bool) -> Self {
        Self {
            cleanup: Some((
                lock.backend.clone(),
                lock.key.clone(),
                value.clone(),
                lease,
                queued,
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
        let Some((backend, key, value, lease, queued, tasks)) = self.cleanup.take() else {
            return;
        };
        if let Ok(handle) = Handle::try_current() {
            tasks.spawn(&handle, async move {
                if queued && let Err(e) = backend.leave_queue(&key, &value, lease).await {
                    tracing::debug!(%key, error = %e, "could not leave the lock's wait queue");
                }
                if let Ok(TokenCheck::Matched) = backend.delete_if_eq(&key, &value, lease).await {
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
    /// (evicted, expired on the server, or the server restarted), found now
    /// or earlier by a renewal (then the cache is not touched again).
    /// Nothing was deleted. Logged as `WARN`.
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

/// The names of the [`metrics`] the lock records (no exporter is installed
/// by cachelock; install one to see them).
pub mod metrics_names {
    /// Histogram, seconds: how long each acquire call took, whatever its
    /// outcome.
    pub const ACQUIRE_WAIT: &str = "cachelock_lock_acquire_wait_seconds";
    /// Counter: acquire calls that got the lock.
    pub const ACQUIRED: &str = "cachelock_lock_acquired_total";
    /// Counter: attempts (atomic adds) made by acquire calls.
    pub const ATTEMPTS: &str = "cachelock_lock_attempts_total";
    /// Counter: acquire calls that ended with [`Error::TimedOut`](crate::Error::TimedOut).
    pub const TIMEOUTS: &str = "cachelock_lock_timeouts_total";
    /// Counter: leases found lost (by extend, keep-alive or release) or run
    /// out by the local deadline while held.
    pub const LOST: &str = "cachelock_lock_lost_total";
    /// Counter, label `outcome` = `ok` | `failed` | `lost`: renewals (by
    /// keep-alive or [`LockGuard::extend`](crate::LockGuard::extend)).
    pub const RENEWALS: &str = "cachelock_lock_renewals_total";
    /// Counter, label `outcome` = `released` | `expired` | `lost` |
    /// `error`: releases, explicit or in the background.
    pub const RELEASES: &str = "cachelock_lock_releases_total";
    /// Counter: guards dropped without [`release`](crate::LockGuard::release)
    /// or [`forget`](crate::LockGuard::forget).
    pub const DROPPED: &str = "cachelock_lock_guards_dropped_total";
}

/// What a guard shares with its keep-alive task and its [`Lost`] signals.
#[derive(Debug)]
struct Lease {
    /// Until when the holder trusts its lease, and whether it is known lost.
    state: watch::Sender<LeaseState>,
    /// Set (once) by release, forget or drop: no renewal starts after it.
    stopped: AtomicBool,
    /// Wakes the keep-alive task when `stopped` is set.
    stop: Notify,
    /// Held across each renewal and across the release, so that a renewal
    /// is never sent after the release started (Redisson #7272). Holds the
    /// backend's version of our value (`Grant::version`), which each
    /// renewal may change.
    ops: tokio::sync::Mutex<Option<Version>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LeaseState {
    /// `lease − margin` after the last successful add or extend was sent;
    /// `None`: too far to represent.
    valid_until: Option<Instant>,
    /// The lease is known lost, or the guard is gone.
    lost: bool,
}

impl Lease {
    fn new(valid_until: Option<Instant>, version: Option<Version>) -> Arc<Self> {
        Arc::new(Self {
            state: watch::Sender::new(LeaseState {
                valid_until,
                lost: false,
            }),
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
            ops: tokio::sync::Mutex::new(version),
        })
    }

    fn snapshot(&self) -> LeaseState {
        *self.state.borrow()
    }

    fn past_deadline(&self) -> bool {
        self.snapshot()
            .valid_until
            .is_some_and(|d| Instant::now() >= d)
    }

    /// Marks the lease lost (once) and wakes the [`Lost`] signals. Returns
    /// whether it was not marked before.
    fn mark_lost(&self) -> bool {
        let first = self
            .state
            .send_if_modified(|s| !std::mem::replace(&mut s.lost, true));
        if first {
            metrics::counter!(metrics_names::LOST).increment(1);
        }
        first
    }

    fn renewed(&self, valid_until: Option<Instant>) {
        self.state.send_modify(|s| s.valid_until = valid_until);
    }

    /// Stops keep-alive for good (release, forget, drop).
    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.stop.notify_waiters();
        self.stop.notify_one();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

/// Completes when a guard's lease is known lost: an owner-checked renewal
/// or release found the key gone or taken, or the local deadline (`lease −
/// margin` after the last successful add or extend) passed without a
/// renewal. It also completes once the guard is released, forgotten or
/// dropped. Get one from [`LockGuard::lost`]; it does not borrow the
/// guard, so it can be moved into the work and used in `tokio::select!`:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> cachelock::Result<()> {
/// # use cachelock::{Cache, MemoryBackend};
/// # let cache = Cache::builder(MemoryBackend::new()).build()?;
/// let guard = cache.lock("job").acquire().await?;
/// guard.keep_alive();
/// tokio::select! {
///     () = guard.lost() => { /* abandon the work: someone else may hold the lock */ }
///     () = async { /* the work */ } => {}
/// }
/// let _ = guard.release().await?;
/// # Ok(()) }
/// ```
///
/// What it does not guarantee: it fires when this process learns or
/// computes that the lease is gone, not at the instant the server drops
/// the key (an eviction is seen at the next renewal, at most a third of
/// the lease later); work already sent to another system is not undone.
///
/// # Cancel safety
///
/// Cancel safe: dropping it changes nothing.
#[must_use = "a Lost signal does nothing unless awaited or polled"]
pub struct Lost {
    rx: watch::Receiver<LeaseState>,
    fut: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lost")
            .field("state", &*self.rx.borrow())
            .finish_non_exhaustive()
    }
}

impl Lost {
    fn new(rx: watch::Receiver<LeaseState>) -> Self {
        let fut = Box::pin(wait_lost(rx.clone()));
        Self { rx, fut }
    }

    /// Whether the lease is lost now (what awaiting would find at once).
    pub fn is_lost(&self) -> bool {
        let s = *self.rx.borrow();
        s.lost
            || s.valid_until.is_some_and(|d| Instant::now() >= d)
            || self.rx.has_changed().is_err()
    }
}

impl Future for Lost {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.fut.as_mut().poll(cx)
    }
}

async fn wait_lost(mut rx: watch::Receiver<LeaseState>) {
    loop {
        let s = *rx.borrow_and_update();
        if s.lost {
            return;
        }
        match s.valid_until {
            Some(until) => {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {
                        // Still the same deadline: no renewal came in time.
                        if rx.borrow().valid_until.is_none_or(|d| d <= Instant::now()) {
                            return;
                        }
                    }
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
            None => {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
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
/// The holder trusts its lease until [`deadline`](Self::deadline): the
/// lease less the lock's [safety margin](LockOptions::safety_margin),
/// counted from before the add was sent. [`keep_alive`](Self::keep_alive)
/// renews it in the background; [`lost`](Self::lost) tells when it is gone.
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
    /// What is stored under the key: the token and who holds it, or in
    /// Django's [`ValueFormat`] the token alone.
    value: Bytes,
    lease: Duration,
    /// The lock's safety margin setting (`None`: the default).
    margin: Option<Duration>,
    /// When keep-alive stops renewing (`max_hold` after the acquire).
    stop_at: Option<Instant>,
    shared: Arc<Lease>,
    held: Arc<AtomicBool>,
    keeping_alive: AtomicBool,
    armed: bool,
    tasks: Tasks,
    fence: u64,
}

/// The set margin, or 1 % of the lease; never more than the lease.
fn margin_for(margin: Option<Duration>, lease: Duration) -> Duration {
    margin.unwrap_or(lease / 100).min(lease)
}

/// `sent + lease − margin`.
fn valid_until(margin: Option<Duration>, sent: Instant, lease: Duration) -> Option<Instant> {
    later(sent, lease.saturating_sub(margin_for(margin, lease)))
}

impl LockGuard {
    fn new(lock: &CacheLock, token: String, value: Bytes, sent: Instant, grant: Grant) -> Self {
        let lease = lock.options.lease;
        Self {
            fence: grant.fence,
            backend: lock.backend.clone(),
            key: lock.key.clone(),
            token,
            value,
            lease,
            margin: lock.options.safety_margin,
            stop_at: lock.options.max_hold.and_then(|h| later(sent, h)),
            shared: Lease::new(
                valid_until(lock.options.safety_margin, sent, lease),
                grant.version,
            ),
            held: lock.held.clone(),
            keeping_alive: AtomicBool::new(false),
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

    /// The fencing number of this grant: larger than that of every earlier
    /// grant of this lock, so a resource that remembers the largest fence it
    /// has seen can refuse a late writer whose lease ran out. Best effort:
    /// see the README's "Fencing" section.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// Until when the holder trusts its lease by the local clock: the lease
    /// less the [safety margin](LockOptions::safety_margin), from before
    /// the last successful add or extend was sent (so it never runs later
    /// than the server's TTL). Moves forward with each renewal.
    pub fn deadline(&self) -> Instant {
        // A lease is at most MAX_DURATION, so this is always set in practice.
        self.shared
            .snapshot()
            .valid_until
            .unwrap_or_else(|| Instant::now() + MAX_DURATION)
    }

    /// Time left on the lease by the local clock; zero once it has run out.
    pub fn remaining(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// Whether the lease is known to be gone: the local deadline passed, or
    /// a renewal found the key lost.
    pub fn is_lost(&self) -> bool {
        self.shared.snapshot().lost || self.shared.past_deadline()
    }

    /// A signal that completes when the lease is lost (see [`Lost`]).
    pub fn lost(&self) -> Lost {
        Lost::new(self.shared.state.subscribe())
    }

    /// Keeps the lease alive in the background until the guard is
    /// released, forgotten or dropped, the lease is lost, or the lock's
    /// [`max_hold`](LockOptions::max_hold) passed since the acquire.
    ///
    /// Every third of the lease an owner-checked extend renews it to a full
    /// lease. A renewal that fails (backend unavailable) is retried quickly
    /// (every tenth of the lease, at most every second) while the lease
    /// still has time; a renewal that finds the key gone or taken, or the
    /// local deadline passing without a successful renewal, marks the lease
    /// lost ([`lost`](Self::lost) completes, `WARN` logged). No renewal is
    /// sent once [`release`](Self::release) has started or the guard was
    /// dropped: release waits for a renewal in flight, then deletes.
    ///
    /// What it does not guarantee: a renewal cannot bring back a key the
    /// cache evicted or lost in a restart; that is found (and reported) at
    /// the next renewal. Calling it again does nothing. Needs a tokio
    /// runtime; outside one it logs an error and does nothing.
    pub fn keep_alive(&self) {
        if self.keeping_alive.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = Handle::try_current() else {
            tracing::error!(key = %self.key, "keep_alive needs a tokio runtime; the lease is not renewed");
            return;
        };
        let span = tracing::debug_span!("cachelock.hold", key = %self.key);
        let first = Instant::now() + self.lease / 3;
        handle.spawn(self.renewer().run(first, None).instrument(span));
    }

    fn renewer(&self) -> Renewer {
        Renewer {
            backend: self.backend.clone(),
            key: self.key.clone(),
            token: self.token.clone(),
            value: self.value.clone(),
            lease: self.lease,
            margin: self.margin,
            shared: self.shared.clone(),
            stop_at: self.stop_at,
        }
    }

    /// A lock handed over by a release (see [`HANDOFF_CLAIM`]) is stored
    /// for `claim` only, from no earlier than `sent`: the guard is valid
    /// for that, and one renewal to the full lease is made in the
    /// background a third of the claim after `sent` (retried quickly while
    /// the claim lasts; if it cannot be made, the lease is lost, as a
    /// failed keep-alive renewal loses it). A holder that releases before
    /// then (a short critical section) sends no renewal at all.
    fn confirm_claim(&self, sent: Instant, claim: Duration) {
        self.shared.renewed(valid_until(self.margin, sent, claim));
        let Ok(handle) = Handle::try_current() else {
            tracing::error!(key = %self.key, "a handed-over lock needs a tokio runtime to extend its claim; the lease will be lost");
            return;
        };
        let span = tracing::debug_span!("cachelock.claim", key = %self.key);
        let quick = claim / 5;
        handle.spawn(
            self.renewer()
                .run(sent + claim / 3, Some(quick))
                .instrument(span),
        );
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
        let mut ops = self.shared.ops.lock().await;
        if self.shared.past_deadline() || self.shared.snapshot().lost {
            self.shared.mark_lost();
            tracing::warn!(
                key = %self.key,
                "cache lock lease ran out before it was extended; the lock is no longer valid"
            );
            return Err(Error::LeaseExpired {
                key: self.key.clone(),
            });
        }
        let sent = Instant::now();
        let check = self
            .backend
            .extend_if_version(&self.key, &self.value, *ops, lease)
            .await;
        match check {
            Ok((TokenCheck::Matched, version)) => {
                *ops = version;
                metrics::counter!(metrics_names::RENEWALS, "outcome" => "ok").increment(1);
                self.shared.renewed(valid_until(self.margin, sent, lease));
                tracing::debug!(
                    key = %self.key,
                    token = %self.token,
                    ?lease,
                    estimated_expiry = ?wall_clock_in(lease),
                    "extended cache lock"
                );
                Ok(())
            }
            Ok((TokenCheck::Mismatch | TokenCheck::Missing, _)) => {
                metrics::counter!(metrics_names::RENEWALS, "outcome" => "lost").increment(1);
                self.shared.mark_lost();
                tracing::warn!(
                    key = %self.key,
                    "cache lock fell out of cache; the lock is no longer valid"
                );
                Err(Error::LeaseExpired {
                    key: self.key.clone(),
                })
            }
            Err(e) => {
                metrics::counter!(metrics_names::RENEWALS, "outcome" => "failed").increment(1);
                Err(e.into())
            }
        }
    }

    /// Releases the lock and reports what was found.
    ///
    /// Past the local lease deadline, the cache is not touched at all
    /// ([`Released::Expired`], logged as `WARN`). Otherwise one
    /// owner-checked delete (one round trip where the backend has an atomic
    /// form) removes the key if it still holds our token. Keep-alive stops
    /// first; a renewal in flight is waited for.
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
        self.shared.stop();
        let span = tracing::debug_span!("cachelock.release", key = %self.key);
        let outcome = release_now(
            &self.backend,
            &self.key,
            &self.token,
            &self.value,
            self.lease,
            &self.shared,
        )
        .instrument(span)
        .await;
        self.disarm();
        outcome
    }

    /// Gives the guard up without releasing: the key stays until its lease
    /// runs out. Keep-alive stops.
    pub fn forget(mut self) {
        self.shared.stop();
        self.disarm();
    }

    fn disarm(&mut self) {
        self.armed = false;
        self.held.store(false, Ordering::Release);
        self.shared.mark_gone();
    }
}

impl Lease {
    /// The guard is gone: its [`Lost`] signals complete (not counted as a
    /// lost lease).
    fn mark_gone(&self) {
        self.state
            .send_if_modified(|s| !std::mem::replace(&mut s.lost, true));
    }
}

/// The keep-alive task of one guard.
struct Renewer {
    backend: SharedBackend,
    key: String,
    token: String,
    /// What the guard stored (token and holder): the owner check compares it.
    value: Bytes,
    lease: Duration,
    margin: Option<Duration>,
    shared: Arc<Lease>,
    /// When `max_hold` ends renewal.
    stop_at: Option<Instant>,
}

impl Renewer {
    /// Renews at `first`, then every third of the lease (keep-alive), or
    /// with `once` (the retry pause) just until one renewal succeeds.
    async fn run(self, first: Instant, once: Option<Duration>) {
        let every = self.lease / 3;
        let quick = once.unwrap_or_else(|| (self.lease / 10).min(Duration::from_secs(1)));
        let mut next = first;
        loop {
            let stopped = self.shared.stop.notified();
            tokio::pin!(stopped);
            stopped.as_mut().enable();
            if self.shared.is_stopped() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = &mut stopped => return,
            }
            if self.stop_at.is_some_and(|t| Instant::now() >= t) {
                tracing::debug!(key = %self.key, "max hold reached; cache lock lease no longer renewed");
                return;
            }
            let mut ops = self.shared.ops.lock().await;
            if self.shared.is_stopped() || self.shared.snapshot().lost {
                return;
            }
            if self.shared.past_deadline() {
                self.lose("cache lock lease ran out before it could be renewed");
                return;
            }
            let sent = Instant::now();
            let check = self
                .backend
                .extend_if_version(&self.key, &self.value, *ops, self.lease)
                .await
                .map(|(check, version)| {
                    if check == TokenCheck::Matched {
                        *ops = version;
                    }
                    check
                });
            match check {
                // Lost is sticky: a reply after the deadline does not revive it.
                Ok(TokenCheck::Matched) if !self.shared.past_deadline() => {
                    metrics::counter!(metrics_names::RENEWALS, "outcome" => "ok").increment(1);
                    self.shared
                        .renewed(valid_until(self.margin, sent, self.lease));
                    tracing::debug!(key = %self.key, token = %self.token, "renewed cache lock lease");
                    if once.is_some() {
                        return;
                    }
                    next = sent + every;
                }
                Ok(TokenCheck::Matched) => {
                    metrics::counter!(metrics_names::RENEWALS, "outcome" => "failed").increment(1);
                    self.lose("cache lock lease renewed too late; the lock is no longer trusted");
                    return;
                }
                Ok(TokenCheck::Mismatch | TokenCheck::Missing) => {
                    metrics::counter!(metrics_names::RENEWALS, "outcome" => "lost").increment(1);
                    self.lose("cache lock fell out of cache; the lock is no longer valid");
                    return;
                }
                Err(e) => {
                    metrics::counter!(metrics_names::RENEWALS, "outcome" => "failed").increment(1);
                    tracing::warn!(key = %self.key, error = %e, retry_in = ?quick, "renewing the cache lock lease failed; retrying");
                    next = Instant::now() + quick;
                }
            }
        }
    }

    fn lose(&self, what: &'static str) {
        if self.shared.mark_lost() {
            tracing::warn!(key = %self.key, "{what}");
        }
    }
}

async fn release_now(
    backend: &SharedBackend,
    key: &str,
    token: &str,
    value: &[u8],
    lease: Duration,
    shared: &Lease,
) -> std::result::Result<Released, BackendError> {
    // Waits for a renewal in flight; none starts after (`stopped` is set).
    let ops = shared.ops.lock().await;
    let outcome = release_locked(backend, key, token, value, *ops, lease, shared).await;
    let label = match &outcome {
        Ok(Released::Released) => "released",
        Ok(Released::Expired) => "expired",
        Ok(Released::Lost) => "lost",
        Err(_) => "error",
    };
    metrics::counter!(metrics_names::RELEASES, "outcome" => label).increment(1);
    outcome
}

async fn release_locked(
    backend: &SharedBackend,
    key: &str,
    token: &str,
    value: &[u8],
    version: Option<Version>,
    lease: Duration,
    shared: &Lease,
) -> std::result::Result<Released, BackendError> {
    let state = shared.snapshot();
    if state.valid_until.is_some_and(|d| Instant::now() >= d) {
        shared.mark_lost();
        tracing::warn!(
            %key,
            "cache lock lease ran out before release; another holder may have run meanwhile; \
             nothing was deleted"
        );
        return Ok(Released::Expired);
    }
    if state.lost {
        tracing::warn!(%key, "cache lock lease was lost before release; nothing was deleted");
        return Ok(Released::Lost);
    }
    match backend
        .delete_if_version(key, value, version, lease)
        .await?
    {
        TokenCheck::Matched => {
            tracing::debug!(%key, %token, "released cache lock");
            Ok(Released::Released)
        }
        check => {
            shared.mark_lost();
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
        self.shared.stop();
        metrics::counter!(metrics_names::DROPPED).increment(1);
        self.held.store(false, Ordering::Release);
        match Handle::try_current() {
            Ok(handle) => {
                let backend = self.backend.clone();
                let key = std::mem::take(&mut self.key);
                let token = std::mem::take(&mut self.token);
                let value = std::mem::take(&mut self.value);
                let lease = self.lease;
                let shared = self.shared.clone();
                let span = tracing::debug_span!("cachelock.release", key = %key);
                tracing::debug!(%key, "cache lock guard dropped; releasing in the background");
                self.tasks.spawn(
                    &handle,
                    async move {
                        if let Err(e) = release_now(&backend, &key, &token, &value, lease, &shared).await {
                            tracing::error!(%key, error = %e, "background release of cache lock failed");
                        }
                        shared.mark_gone();
                    }
                    .instrument(span),
                );
            }
            Err(_) => {
                self.shared.mark_gone();
                tracing::error!(
                    key = %self.key,
                    "cache lock guard dropped without release and with no runtime to release it; \
                     the lock stays until its lease runs out"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_hand_off_is_trusted_only_after_the_last_held_attempt() {
        let claim = Duration::from_secs(1);
        let sent = Instant::now();
        // No attempt seen held: the next attempt settles it.
        assert_eq!(handoff_base(None, 9, claim), None);
        // A grant after the attempt (a larger fence): from the attempt.
        assert_eq!(handoff_base(Some((sent, 8)), 9, claim), Some(sent));
        // A notice from before the attempt: not trusted.
        assert_eq!(handoff_base(Some((sent, 9)), 9, claim), None);
        assert_eq!(handoff_base(Some((sent, 10)), 9, claim), None);
        // An attempt too long ago: the guard would lose too much.
        tokio::time::advance(claim / 2).await;
        assert_eq!(handoff_base(Some((sent, 8)), 9, claim), Some(sent));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(handoff_base(Some((sent, 8)), 9, claim), None);
    }
}
