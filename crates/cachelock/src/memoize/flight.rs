//! Single flight within one process: concurrent memoize calls for the same
//! backend and full key share one attempt (moka's `get_with` idea).
//!
//! The first caller becomes the leader and registers a watch channel under
//! (backend address, key); later callers subscribe and wait. The leader
//! publishes the value's encoded bytes (the waiters decode them, so `T`
//! need not be `Clone`) or `Retry` (compute failed, nothing to share). A
//! leader that is dropped without finishing closes the channel, which also
//! wakes the waiters to retry.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::backend::SharedBackend;

type FlightKey = (usize, String);

/// What a finished attempt left for its waiters.
#[derive(Debug, Clone)]
pub(crate) enum FlightOutcome {
    /// The value's postcard bytes.
    Done(Bytes),
    /// No value to share (the leader was dropped, or could not encode):
    /// try again, in a new flight.
    Retry,
    /// The leader's compute failed. Its error cannot be shared, so each
    /// waiter goes on alone (under the lock, if one is configured) instead
    /// of queueing behind one new leader after another.
    ComputeFailed,
    /// The leader could not take the lock and the options say fail: the
    /// waiters fail the same way instead of each waiting out the timeout
    /// again.
    LockFailed(LockFailure),
}

/// A lock failure the waiters can rebuild as their own error.
#[derive(Debug, Clone)]
pub(crate) enum LockFailure {
    /// [`Error::TimedOut`](crate::Error::TimedOut).
    TimedOut {
        key: String,
        waited: std::time::Duration,
    },
    /// [`Error::Held`](crate::Error::Held).
    Held { key: String },
}

impl LockFailure {
    /// Captures `e` if it is one of the shareable lock failures.
    pub(crate) fn from_error(e: &crate::Error) -> Option<Self> {
        match e {
            crate::Error::TimedOut { key, waited } => Some(Self::TimedOut {
                key: key.clone(),
                waited: *waited,
            }),
            crate::Error::Held { key } => Some(Self::Held { key: key.clone() }),
            _ => None,
        }
    }

    /// The error, rebuilt.
    pub(crate) fn to_error(&self) -> crate::Error {
        match self {
            Self::TimedOut { key, waited } => crate::Error::TimedOut {
                key: key.clone(),
                waited: *waited,
            },
            Self::Held { key } => crate::Error::Held { key: key.clone() },
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    Running,
    Finished(FlightOutcome),
}

type FlightMap = HashMap<FlightKey, (u64, watch::Receiver<State>)>;

static FLIGHTS: LazyLock<Mutex<FlightMap>> = LazyLock::new(|| Mutex::new(HashMap::new()));
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The leader's handle; dropping it without [`Flight::finish`] makes the
/// waiters retry.
#[derive(Debug)]
pub(crate) struct Flight {
    key: FlightKey,
    id: u64,
    tx: watch::Sender<State>,
}

/// A waiter's handle.
#[derive(Debug)]
pub(crate) struct Waiter {
    rx: watch::Receiver<State>,
}

/// The result of joining.
#[derive(Debug)]
pub(crate) enum Joined {
    /// Nobody else is on it: we lead.
    Leader(Flight),
    /// Someone else leads: wait for them.
    Follower(Waiter),
}

fn backend_id(cache: &SharedBackend) -> usize {
    std::sync::Arc::as_ptr(cache) as *const () as usize
}

impl Flight {
    /// Joins the attempt for `key` on `cache`, or starts one.
    pub(crate) fn join(cache: &SharedBackend, key: &str) -> Joined {
        let fkey = (backend_id(cache), key.to_owned());
        let mut map = FLIGHTS.lock();
        if let Some((_, rx)) = map.get(&fkey)
            && matches!(*rx.borrow(), State::Running)
            && rx.has_changed().is_ok()
        {
            return Joined::Follower(Waiter { rx: rx.clone() });
        }
        let (tx, rx) = watch::channel(State::Running);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        map.insert(fkey.clone(), (id, rx));
        Joined::Leader(Flight { key: fkey, id, tx })
    }

    /// Publishes the outcome (if leading) and leaves the map.
    pub(crate) fn finish(flight: Option<Flight>, outcome: FlightOutcome) {
        if let Some(f) = flight {
            f.tx.send_replace(State::Finished(outcome));
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        let mut map = FLIGHTS.lock();
        if map.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.key);
        }
    }
}

impl Waiter {
    /// Waits for the leader to finish or go away.
    pub(crate) async fn wait(mut self) -> FlightOutcome {
        loop {
            if let State::Finished(o) = &*self.rx.borrow_and_update() {
                return o.clone();
            }
            if self.rx.changed().await.is_err() {
                return match &*self.rx.borrow() {
                    State::Finished(o) => o.clone(),
                    State::Running => FlightOutcome::Retry,
                };
            }
        }
    }
}
