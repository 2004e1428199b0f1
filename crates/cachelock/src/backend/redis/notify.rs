//! Release notification over Redis pub/sub.
//!
//! Each released lock is announced by a `PUBLISH` on the channel
//! `cachelock:released:<db>:<key>`, sent by the release script itself (so
//! atomic with the delete), or right after `DELEX`/`DELIFEQ`. The message
//! is empty for a lock that was freed, and `<fence>:<waiter's value>` for
//! one the script handed to the first waiter in line (that waiter holds it
//! now; see the lock's module docs). One subscriber
//! connection per backend (per process, in practice) carries the
//! subscriptions of all its waiters: a key is subscribed once, when a
//! waiter first waits for it, and stays subscribed (at most
//! [`MAX_SUBSCRIBED`] keys; beyond that, waiters poll). The wake-up is armed
//! only once the server has confirmed the subscription. If the subscriber
//! connection drops, the subscriptions are forgotten and the next wait
//! opens a new connection; meanwhile waiters poll.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ::redis::aio::PubSubSink;
use futures_util::StreamExt;
use parking_lot::Mutex;

use super::link::SingleLink;
use crate::backend::notify::{Handoff, Notifier, ReleaseWatch};

/// The most keys subscribed at once.
pub(super) const MAX_SUBSCRIBED: usize = 1024;

/// The pub/sub side of one standalone backend.
#[derive(Debug)]
pub(super) struct RedisNotify {
    prefix: String,
    notifier: Arc<Notifier>,
    subscribed: Arc<Mutex<HashSet<String>>>,
    sink: tokio::sync::Mutex<Option<Subscriber>>,
}

#[derive(Debug)]
struct Subscriber {
    sink: PubSubSink,
    closed: Arc<AtomicBool>,
    reader: tokio::task::AbortHandle,
}

impl Drop for RedisNotify {
    fn drop(&mut self) {
        if let Some(sub) = self.sink.get_mut().take() {
            sub.reader.abort();
        }
    }
}

impl RedisNotify {
    pub(super) fn new(db: i64) -> Self {
        Self {
            prefix: format!("cachelock:released:{db}:"),
            notifier: Arc::default(),
            subscribed: Arc::default(),
            sink: tokio::sync::Mutex::new(None),
        }
    }

    /// The channel a release of `key` is announced on.
    pub(super) fn channel(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The channel name for a backend without a subscriber (Cluster): the
    /// release still announces itself for other clients.
    pub(super) fn channel_for(db: i64, key: &str) -> String {
        format!("cachelock:released:{db}:{key}")
    }

    /// Arms a watch on `key`, subscribing first if needed. Polls (a
    /// [`ReleaseWatch::polling`]) if the subscription cannot be made.
    pub(super) async fn watch(&self, link: &SingleLink, key: &str) -> ReleaseWatch {
        let rx = self.notifier.watch(key);
        if self.subscribed.lock().contains(key) {
            return ReleaseWatch::notified(rx, None);
        }
        match self.subscribe(link, key).await {
            Ok(true) => ReleaseWatch::notified(rx, None),
            Ok(false) => ReleaseWatch::polling(),
            Err(e) => {
                tracing::debug!(%key, error = %e, "cannot subscribe to Redis release notices; polling");
                ReleaseWatch::polling()
            }
        }
    }

    /// A watch on `key` if it is already subscribed (no I/O), else `None`.
    pub(super) fn watch_subscribed(&self, key: &str) -> Option<ReleaseWatch> {
        let rx = self.notifier.watch(key);
        self.subscribed
            .lock()
            .contains(key)
            .then(|| ReleaseWatch::notified(rx, None))
    }

    async fn subscribe(&self, link: &SingleLink, key: &str) -> ::redis::RedisResult<bool> {
        let mut slot = self.sink.lock().await;
        let closed = slot
            .as_ref()
            .is_some_and(|s| s.closed.load(Ordering::Acquire));
        if closed && let Some(old) = slot.take() {
            old.reader.abort();
        }
        if self.subscribed.lock().len() >= MAX_SUBSCRIBED {
            return Ok(false);
        }
        let sub = match slot.as_mut() {
            Some(sub) => sub,
            None => slot.insert(self.open(link).await?),
        };
        sub.sink.subscribe(self.channel(key)).await?;
        self.subscribed.lock().insert(key.to_owned());
        Ok(true)
    }

    async fn open(&self, link: &SingleLink) -> ::redis::RedisResult<Subscriber> {
        let (sink, mut stream) = link.open_pubsub().await?.split();
        let closed = Arc::new(AtomicBool::new(false));
        let (notifier, subscribed, prefix) = (
            self.notifier.clone(),
            self.subscribed.clone(),
            self.prefix.clone(),
        );
        let flag = closed.clone();
        let reader = tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                if let Some(key) = msg.get_channel_name().strip_prefix(prefix.as_str()) {
                    notifier.notify_handed(key, handoff(msg.get_payload_bytes()));
                }
            }
            tracing::debug!(
                "Redis subscriber connection closed; waiters poll until it is reopened"
            );
            flag.store(true, Ordering::Release);
            subscribed.lock().clear();
        })
        .abort_handle();
        Ok(Subscriber {
            sink,
            closed,
            reader,
        })
    }

    /// Notes a release of ours that reached `subscribers` connections.
    pub(super) fn released(&self, key: &str, subscribers: usize) {
        let ours = usize::from(self.subscribed.lock().contains(key));
        let others = subscribers.saturating_sub(ours) + self.notifier.waiters(key);
        self.notifier.released(key, others);
    }

    pub(super) fn handed_off_at(&self, key: &str) -> Option<tokio::time::Instant> {
        self.notifier.handed_off_at(key)
    }
}

/// The waiter and fence a release notice names: its payload is
/// `<fence>:<waiter's value>` (the script `hand_on`), empty for a lock
/// that was freed. Anything else (another client's notice) names no one,
/// so every waiter tries.
fn handoff(payload: &[u8]) -> Option<Handoff> {
    let colon = payload.iter().position(|&b| b == b':')?;
    let (digits, value) = (payload.get(..colon)?, payload.get(colon + 1..)?);
    let fence = std::str::from_utf8(digits).ok()?.parse::<u64>().ok()?;
    (fence > 0 && !value.is_empty() && digits.iter().all(u8::is_ascii_digit)).then(|| Handoff {
        value: bytes::Bytes::copy_from_slice(value),
        fence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_name_the_waiter_and_fence_or_no_one() {
        let h = handoff(b"42:host:1:abc").unwrap();
        assert_eq!((h.value.as_ref(), h.fence), (&b"host:1:abc"[..], 42));
        for other in [
            &b""[..],
            b"abc",
            b":x",
            b"0:x",
            b"12:",
            b"+1:x",
            b"99999999999999999999:x",
        ] {
            assert_eq!(handoff(other), None, "{other:?}");
        }
    }
}
