//! Single flight within one handle: concurrent memoize calls of one
//! [`Cache`](crate::Cache) for the same full key and value type share one
//! attempt (moka's `get_with` idea, its `value_initializer.rs`).
//!
//! The first caller becomes the leader and registers a cell under (full
//! key, `TypeId` of the value); later callers find it and wait. The leader reads the
//! cache and, on a miss, computes; it then publishes the value's encoded
//! bytes (the waiters decode them, so `T` need not be `Clone`) or why there
//! is none. A leader dropped without finishing publishes `Retry`, so a
//! waiter takes over.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

type FlightKey = (String, TypeId);

/// How many times a follower joins a new flight after leaders that were
/// dropped before finishing; then it goes on alone.
pub(crate) const MAX_RETRIES: u32 = 8;

/// What a finished attempt left for its waiters.
#[derive(Debug, Clone)]
pub(crate) enum FlightOutcome {
    /// The value's postcard bytes.
    Done(Bytes),
    /// The leader was dropped: try again, in a new flight.
    Retry,
    /// The leader's compute failed (or its value could not be encoded).
    /// Its error cannot be shared, so each
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

#[derive(Debug, Default)]
struct Cell {
    outcome: Mutex<Option<FlightOutcome>>,
    notify: Notify,
}

type Table = Arc<Mutex<HashMap<FlightKey, Arc<Cell>>>>;

/// The flights of one handle.
#[derive(Debug, Clone, Default)]
pub(crate) struct Flights(Table);

impl Flights {
    /// Joins the attempt for `key` and value type `T`, or starts one.
    pub(crate) fn join<T: 'static>(&self, key: &str) -> Joined {
        let fkey = (key.to_owned(), TypeId::of::<T>());
        let mut map = self.0.lock();
        if let Some(cell) = map.get(&fkey) {
            return Joined::Follower(Waiter { cell: cell.clone() });
        }
        let cell = Arc::new(Cell::default());
        map.insert(fkey.clone(), cell.clone());
        Joined::Leader(Flight {
            table: self.0.clone(),
            key: fkey,
            cell,
            finished: false,
        })
    }
}

/// The leader's handle; dropping it without [`Flight::finish`] makes the
/// waiters retry.
#[derive(Debug)]
pub(crate) struct Flight {
    table: Table,
    key: FlightKey,
    cell: Arc<Cell>,
    finished: bool,
}

/// A waiter's handle.
#[derive(Debug)]
pub(crate) struct Waiter {
    cell: Arc<Cell>,
}

/// The result of joining.
#[derive(Debug)]
pub(crate) enum Joined {
    /// Nobody else is on it: we lead.
    Leader(Flight),
    /// Someone else leads: wait for them.
    Follower(Waiter),
}

impl Flight {
    /// Publishes the outcome (if leading): the cell leaves the map first,
    /// so a later caller starts afresh, then the waiters are woken.
    pub(crate) fn finish(flight: Option<Flight>, outcome: FlightOutcome) {
        if let Some(mut f) = flight {
            f.publish(outcome);
        }
    }

    fn publish(&mut self, outcome: FlightOutcome) {
        if self.finished {
            return;
        }
        self.finished = true;
        {
            let mut map = self.table.lock();
            if map
                .get(&self.key)
                .is_some_and(|c| Arc::ptr_eq(c, &self.cell))
            {
                map.remove(&self.key);
            }
        }
        *self.cell.outcome.lock() = Some(outcome);
        self.cell.notify.notify_waiters();
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.publish(FlightOutcome::Retry);
    }
}

impl Waiter {
    /// Waits for the leader to finish or go away.
    pub(crate) async fn wait(self) -> FlightOutcome {
        loop {
            let notified = self.cell.notify.notified();
            tokio::pin!(notified);
            // Register before looking, so a wake-up in between is not lost.
            notified.as_mut().enable();
            if let Some(outcome) = self.cell.outcome.lock().clone() {
                return outcome;
            }
            notified.await;
        }
    }
}
