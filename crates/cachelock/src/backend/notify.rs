//! Release notification: how a waiter learns that a lock was released
//! without polling for it.
//!
//! A waiter **arms** a [`ReleaseWatch`] before each attempt
//! ([`Backend::watch_release`](super::Backend::watch_release)), makes the
//! attempt, and if the lock is held waits for the watch or the poll
//! interval, whichever comes first. A release that happens between the arm
//! and the wait is not lost: the watch remembers it and completes at once.
//! A release that is never announced (the holder died and the key expired,
//! a message was lost) costs at most one poll interval, or less where the
//! backend knows when the holder's lease runs out (the embedded backend).

use std::collections::HashMap;
use std::future::pending;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

/// The most keys a [`Notifier`] tracks before it drops the ones nobody
/// waits for (memory stays bounded by the number of waiting keys).
const MAX_IDLE_KEYS: usize = 1024;

/// A wake-up armed for the release of one key (see the module docs).
///
/// [`ReleaseWatch::polling`] is the watch of a backend that cannot notify:
/// it never completes, and waiters poll.
#[derive(Debug)]
pub struct ReleaseWatch {
    rx: Option<watch::Receiver<Notice>>,
    /// When the holder's lease runs out, where the backend knows it.
    expires: Option<Instant>,
    /// The waiter the last release seen handed the lock to, if it named one.
    next: Option<Handoff>,
}

/// What a release announced: a sequence number that changes with every
/// release, and the waiter the lock was handed to, for a backend that
/// hands off in queue order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Notice {
    seq: u64,
    next: Option<Handoff>,
}

/// A release that handed the lock straight to a waiter in line: the
/// waiter's stored value (it holds the lock now) and the grant's fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Handoff {
    pub(crate) value: Bytes,
    pub(crate) fence: u64,
}

impl ReleaseWatch {
    /// A watch that never fires: the backend cannot notify, waiters poll.
    pub fn polling() -> Self {
        Self {
            rx: None,
            expires: None,
            next: None,
        }
    }

    pub(crate) fn notified(rx: watch::Receiver<Notice>, expires: Option<Instant>) -> Self {
        Self {
            rx: Some(rx),
            expires,
            next: None,
        }
    }

    /// Whether the last release this watch saw handed the lock to another
    /// waiter than the one whose stored value is `ours` (a queue hand-off:
    /// that waiter holds it now, so trying would only be refused).
    pub fn handed_to_other(&self, ours: &[u8]) -> bool {
        self.next
            .as_ref()
            .is_some_and(|next| next.value.as_ref() != ours)
    }

    /// The fence of the grant if the last release this watch saw handed
    /// the lock to the waiter whose stored value is `ours`: that waiter
    /// holds it now (see [`Backend::add_queued`](super::Backend::add_queued)).
    pub fn handed_to_us(&self, ours: &[u8]) -> Option<u64> {
        self.next
            .as_ref()
            .filter(|next| next.value.as_ref() == ours)
            .map(|next| next.fence)
    }

    /// Whether a release will complete this watch (false: poll only).
    pub fn is_notified(&self) -> bool {
        self.rx.is_some()
    }

    /// Completes when the key was released after the watch was armed, or
    /// when the holder's lease runs out (where known). Never completes for
    /// a [`polling`](Self::polling) watch.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a release seen by a dropped call is seen again by the
    /// next one.
    pub async fn released(&mut self) {
        let expiry = async {
            match self.expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => pending().await,
            }
        };
        let signal = async {
            match self.rx.as_mut() {
                Some(rx) => {
                    if rx.changed().await.is_err() {
                        // The notifier is gone: nothing will come.
                        pending::<()>().await;
                    }
                    rx.borrow_and_update().next.clone()
                }
                None => pending().await,
            }
        };
        self.next = tokio::select! {
            () = expiry => None,
            next = signal => next,
        };
    }
}

/// The in-process side of notification: one channel per key that a waiter
/// of this process watches. A backend calls [`notify`](Self::notify) when
/// it deletes a key (the embedded backends) or hears that another process
/// did (Redis pub/sub).
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    keys: HashMap<String, watch::Sender<Notice>>,
    /// When this process last released a key while others waited for it.
    handoffs: HashMap<String, Instant>,
}

impl Notifier {
    /// Arms a watch on `key`: it sees every later [`notify`](Self::notify).
    pub(crate) fn watch(&self, key: &str) -> watch::Receiver<Notice> {
        let mut state = self.state.lock();
        if let Some(tx) = state.keys.get(key) {
            return tx.subscribe();
        }
        if state.keys.len() >= MAX_IDLE_KEYS {
            state.keys.retain(|_, tx| tx.receiver_count() > 0);
        }
        let (tx, rx) = watch::channel(Notice::default());
        state.keys.insert(key.to_owned(), tx);
        rx
    }

    /// Wakes the waiters of `key` in this process; returns how many there
    /// were.
    pub(crate) fn notify(&self, key: &str) -> usize {
        self.notify_handed(key, None)
    }

    /// As [`notify`](Self::notify), telling the waiters that the lock was
    /// handed to a waiter (if `next` names one).
    pub(crate) fn notify_handed(&self, key: &str, next: Option<Handoff>) -> usize {
        let mut state = self.state.lock();
        let Some(tx) = state.keys.get(key) else {
            return 0;
        };
        let waiters = tx.receiver_count();
        if waiters == 0 {
            state.keys.remove(key);
        } else {
            tx.send_modify(|n| {
                n.seq = n.seq.wrapping_add(1);
                n.next = next;
            });
        }
        waiters
    }

    /// How many waiters of this process watch `key`.
    pub(crate) fn waiters(&self, key: &str) -> usize {
        self.state
            .lock()
            .keys
            .get(key)
            .map_or(0, watch::Sender::receiver_count)
    }

    /// Notes that this process released `key` while `others` waited for
    /// it (here or elsewhere), for the hand-off grace.
    pub(crate) fn released(&self, key: &str, others: usize) {
        let mut state = self.state.lock();
        if others == 0 {
            state.handoffs.remove(key);
            return;
        }
        if state.handoffs.len() >= MAX_IDLE_KEYS {
            state.handoffs.clear();
        }
        state.handoffs.insert(key.to_owned(), Instant::now());
    }

    /// When this process last released `key` to waiting others.
    pub(crate) fn handed_off_at(&self, key: &str) -> Option<Instant> {
        self.state.lock().handoffs.get(key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_release_between_arm_and_wait_is_not_lost() {
        let n = Notifier::default();
        let mut w = ReleaseWatch::notified(n.watch("k"), None);
        assert_eq!(n.notify("k"), 1);
        // Already released: completes at once.
        tokio::time::timeout(std::time::Duration::from_millis(100), w.released())
            .await
            .expect("the release before the wait was lost");
    }

    #[tokio::test]
    async fn a_hand_off_names_the_next_waiter() {
        let n = Notifier::default();
        let mut w = ReleaseWatch::notified(n.watch("k"), None);
        assert!(!w.handed_to_other(b"me"));
        let to_other = Handoff {
            value: Bytes::from_static(b"other"),
            fence: 7,
        };
        n.notify_handed("k", Some(to_other));
        w.released().await;
        assert!(w.handed_to_other(b"me"));
        assert_eq!(w.handed_to_us(b"me"), None);
        assert!(!w.handed_to_other(b"other"));
        assert_eq!(w.handed_to_us(b"other"), Some(7));
        // A plain release names no one.
        n.notify("k");
        w.released().await;
        assert!(!w.handed_to_other(b"me"));
        assert_eq!(w.handed_to_us(b"other"), None);
    }

    #[tokio::test]
    async fn idle_keys_are_dropped() {
        let n = Notifier::default();
        for i in 0..(MAX_IDLE_KEYS + 10) {
            drop(n.watch(&format!("k{i}")));
        }
        assert!(n.state.lock().keys.len() <= MAX_IDLE_KEYS);
        assert_eq!(n.notify("k0"), 0);
    }
}
