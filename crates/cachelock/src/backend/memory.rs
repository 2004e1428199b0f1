//! The embedded in-process backend.
//!
//! A real cache, not a mock: every operation is atomic (one mutex guards the
//! map), keys expire on [`tokio::time`] (so tests on paused time see TTLs
//! pass without sleeping), and an optional byte capacity evicts entries the
//! way a full Memcached does, so the lock's "lost lease" paths can be tested.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::notify::{Notifier, ReleaseWatch};
use super::{
    Backend, DEFAULT_MAX_VALUE_SIZE, FENCE_TTL, Grant, Listed, TokenCheck, ValueFormat,
    check_value_size, fence_floor, fence_key, next_fence,
};
use crate::error::{BackendError, BackendResult};

/// Bytes counted for each entry on top of its key and value, for capacity.
const ENTRY_OVERHEAD: usize = 48;

/// The fewest entries at which expired entries are swept.
const MIN_SWEEP_AT: usize = 1024;

#[derive(Debug)]
struct Entry {
    value: Bytes,
    /// `None` means no expiry (only `incr` creates such entries).
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| now < t)
    }

    fn size(key: &str, value: &[u8]) -> usize {
        key.len() + value.len() + ENTRY_OVERHEAD
    }
}

#[derive(Debug)]
struct State {
    map: HashMap<String, Entry>,
    /// Bytes in use, by [`Entry::size`].
    used: usize,
    /// When a write makes the map this large, expired entries are swept out.
    sweep_at: usize,
}

impl Default for State {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            used: 0,
            sweep_at: MIN_SWEEP_AT,
        }
    }
}

impl State {
    /// The live entry under `key`; an expired one is removed.
    fn live(&mut self, key: &str, now: Instant) -> Option<&mut Entry> {
        if self.map.get(key).is_some_and(|e| !e.live(now)) {
            self.remove(key);
        }
        self.map.get_mut(key)
    }

    /// The value of the live entry under `key` (one lookup when it is
    /// live); an expired one is removed.
    fn read(&mut self, key: &str, now: Instant) -> Option<Bytes> {
        let e = self.map.get(key)?;
        if e.live(now) {
            return Some(e.value.clone());
        }
        self.remove(key);
        None
    }

    fn remove(&mut self, key: &str) -> Option<Entry> {
        let e = self.map.remove(key)?;
        self.used -= Entry::size(key, &e.value);
        Some(e)
    }

    fn insert(&mut self, key: &str, value: Bytes, expires: Option<Instant>, now: Instant) {
        self.remove(key);
        self.used += Entry::size(key, &value);
        self.map.insert(key.to_owned(), Entry { value, expires });
        if self.map.len() >= self.sweep_at {
            self.sweep(now);
        }
    }

    /// Drops every expired entry, then sets the next sweep for when the map
    /// has doubled: amortized, each write pays for O(1) entries swept, and
    /// expired entries never make up more than about half of the map (keys
    /// that are written once and never read again do not pile up).
    fn sweep(&mut self, now: Instant) {
        let before = self.map.len();
        let mut freed = 0;
        self.map.retain(|k, e| {
            let live = e.live(now);
            if !live {
                freed += Entry::size(k, &e.value);
            }
            live
        });
        self.used -= freed;
        self.sweep_at = (self.map.len() * 2).max(MIN_SWEEP_AT);
        tracing::trace!(
            swept = before - self.map.len(),
            left = self.map.len(),
            "memory backend swept expired entries"
        );
    }

    /// Evicts entries until `used` fits `capacity`: expired ones first, then
    /// any others (in the map's arbitrary order), never `keep`.
    fn evict(&mut self, capacity: usize, keep: &str, now: Instant) -> usize {
        if self.used <= capacity {
            return 0;
        }
        let expired: Vec<String> = self
            .map
            .iter()
            .filter(|(_, e)| !e.live(now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            self.remove(k);
        }
        let mut evicted = 0;
        while self.used > capacity {
            let Some(victim) = self.map.keys().find(|k| *k != keep).cloned() else {
                break;
            };
            self.remove(&victim);
            evicted += 1;
        }
        evicted
    }
}

/// The embedded in-process cache backend.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use cachelock::{Backend, MemoryBackend};
///
/// let cache = MemoryBackend::new();
/// assert!(cache.add("k", b"v", Duration::from_secs(5)).await.unwrap());
/// assert!(!cache.add("k", b"w", Duration::from_secs(5)).await.unwrap());
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryBackend {
    state: Mutex<State>,
    capacity: Option<usize>,
    max_value_size: usize,
    /// Wakes waiters when a key is deleted.
    notifier: Notifier,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// An unbounded cache whose items may hold up to
    /// [`DEFAULT_MAX_VALUE_SIZE`] bytes, like a default Memcached.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            capacity: None,
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            notifier: Notifier::default(),
        }
    }

    /// Limits the bytes held (keys, values and a small per-entry overhead).
    /// When a write goes over it, expired entries are dropped first, then
    /// other entries are evicted, as a full cache server does.
    #[must_use]
    pub fn with_capacity(mut self, bytes: usize) -> Self {
        self.capacity = Some(bytes);
        self
    }

    /// Sets the largest value one item may hold. Defaults to
    /// [`DEFAULT_MAX_VALUE_SIZE`].
    #[must_use]
    pub fn with_max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// The number of entries stored, expired ones not yet dropped included.
    ///
    /// Expired entries are dropped when they are next looked at, and all at
    /// once whenever a write finds the map twice as large as after the last
    /// such sweep (at least 1,024 entries), so under churn the count stays
    /// within about twice the number of live entries.
    pub fn len(&self) -> usize {
        self.state.lock().map.len()
    }

    /// Whether no entry is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn store(&self, state: &mut State, key: &str, value: &[u8], ttl: Duration, now: Instant) {
        state.insert(
            key,
            Bytes::copy_from_slice(value),
            Some(deadline(now, ttl)),
            now,
        );
        if let Some(cap) = self.capacity {
            let evicted = state.evict(cap, key, now);
            if evicted > 0 {
                tracing::debug!(
                    evicted,
                    "memory backend evicted entries to stay within capacity"
                );
            }
        }
    }
}

/// The longest TTL kept: 100 years (as on Redis). Longer ones are cut to it
/// (the clock cannot add `Duration::MAX`).
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// When an entry written now with `ttl` expires. A zero TTL lives for the
/// shortest time the clock can tell, never forever; a TTL over [`MAX_TTL`]
/// is cut to it.
fn deadline(now: Instant, ttl: Duration) -> Instant {
    let ttl = ttl.clamp(Duration::from_nanos(1), MAX_TTL);
    now.checked_add(ttl).unwrap_or(now)
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn get(&self, key: &str) -> BackendResult<Option<Bytes>> {
        let now = Instant::now();
        Ok(self.state.lock().read(key, now))
    }

    async fn get_many(&self, keys: &[&str]) -> BackendResult<Vec<Option<Bytes>>> {
        let now = Instant::now();
        let mut state = self.state.lock();
        Ok(keys.iter().map(|k| state.read(k, now)).collect())
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<()> {
        check_value_size(key, value, self.max_value_size())?;
        let now = Instant::now();
        self.store(&mut self.state.lock(), key, value, ttl, now);
        Ok(())
    }

    async fn set_many(&self, items: &[(&str, &[u8])], ttl: Duration) -> BackendResult<()> {
        for (k, v) in items {
            check_value_size(k, v, self.max_value_size())?;
        }
        let now = Instant::now();
        let mut state = self.state.lock();
        for (k, v) in items {
            self.store(&mut state, k, v, ttl, now);
        }
        Ok(())
    }

    async fn add(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<bool> {
        check_value_size(key, value, self.max_value_size())?;
        let now = Instant::now();
        let mut state = self.state.lock();
        if state.live(key, now).is_some() {
            return Ok(false);
        }
        self.store(&mut state, key, value, ttl, now);
        Ok(true)
    }

    /// The compare and the store under one hold of the map's lock.
    async fn set_if(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Duration,
    ) -> BackendResult<bool> {
        check_value_size(key, value, self.max_value_size())?;
        let now = Instant::now();
        let mut state = self.state.lock();
        let current = state.live(key, now).map(|e| &e.value[..]);
        if current != expected {
            return Ok(false);
        }
        self.store(&mut state, key, value, ttl, now);
        Ok(true)
    }

    /// The add and the increment under one hold of the map's lock.
    async fn add_fenced(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        _format: ValueFormat,
    ) -> BackendResult<Option<Grant>> {
        check_value_size(key, value, self.max_value_size())?;
        let counter_key = fence_key(key);
        let floor = fence_floor(std::time::SystemTime::now());
        let now = Instant::now();
        let mut state = self.state.lock();
        if state.live(key, now).is_some() {
            return Ok(None);
        }
        let counter = state
            .live(&counter_key, now)
            .and_then(|e| std::str::from_utf8(&e.value).ok()?.parse::<u64>().ok())
            .map_or(0, |n| n.saturating_add(1));
        let fence = next_fence(counter, floor);
        // The counter first: storing the lock last keeps it from being the
        // entry a capacity limit evicts to make room.
        self.store(
            &mut state,
            &counter_key,
            fence.to_string().as_bytes(),
            FENCE_TTL,
            now,
        );
        self.store(&mut state, key, value, ttl, now);
        Ok(Some(Grant {
            fence,
            version: None,
        }))
    }

    async fn touch(&self, key: &str, ttl: Duration) -> BackendResult<bool> {
        let now = Instant::now();
        Ok(match self.state.lock().live(key, now) {
            Some(e) => {
                e.expires = Some(deadline(now, ttl));
                true
            }
            None => false,
        })
    }

    async fn delete(&self, key: &str) -> BackendResult<bool> {
        let now = Instant::now();
        let mut state = self.state.lock();
        let existed = state.live(key, now).is_some();
        state.remove(key);
        drop(state);
        if existed {
            self.notifier.notify(key);
        }
        Ok(existed)
    }

    async fn incr(&self, key: &str, delta: u64) -> BackendResult<u64> {
        let now = Instant::now();
        let mut state = self.state.lock();
        let (new, expires) = match state.live(key, now) {
            Some(e) => {
                let current: u64 = std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| {
                        BackendError::protocol(
                            key,
                            "cannot increment a value that is not a decimal number",
                        )
                    })?;
                let new = current.checked_add(delta).ok_or_else(|| {
                    BackendError::protocol(key, "increment would overflow a 64-bit counter")
                })?;
                (new, e.expires)
            }
            None => (delta, None),
        };
        state.insert(key, Bytes::from(new.to_string()), expires, now);
        Ok(new)
    }

    async fn delete_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        _hold: Duration,
    ) -> BackendResult<TokenCheck> {
        let now = Instant::now();
        let mut state = self.state.lock();
        let check = match state.live(key, now) {
            None => TokenCheck::Missing,
            Some(e) if e.value.as_ref() != expected => TokenCheck::Mismatch,
            Some(_) => TokenCheck::Matched,
        };
        if check == TokenCheck::Matched {
            state.remove(key);
            drop(state);
            let woken = self.notifier.notify(key);
            self.notifier.released(key, woken);
        }
        Ok(check)
    }

    async fn extend_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        ttl: Duration,
    ) -> BackendResult<TokenCheck> {
        let now = Instant::now();
        Ok(match self.state.lock().live(key, now) {
            None => TokenCheck::Missing,
            Some(e) if e.value.as_ref() != expected => TokenCheck::Mismatch,
            Some(e) => {
                e.expires = Some(deadline(now, ttl));
                TokenCheck::Matched
            }
        })
    }

    async fn ttl(&self, key: &str) -> BackendResult<Option<Duration>> {
        let now = Instant::now();
        Ok(self
            .state
            .lock()
            .live(key, now)
            .and_then(|e| e.expires)
            .map(|t| t.saturating_duration_since(now)))
    }

    async fn list(&self, prefix: &str, limit: usize) -> BackendResult<Vec<Listed>> {
        let now = Instant::now();
        let state = self.state.lock();
        Ok(state
            .map
            .iter()
            .filter(|(k, e)| k.starts_with(prefix) && e.live(now))
            .take(limit)
            .map(|(k, e)| Listed {
                key: k.clone(),
                value: e.value.clone(),
                ttl: e.expires.map(|t| t.saturating_duration_since(now)),
            })
            .collect())
    }

    /// In process: armed under the map's lock, so no delete is missed; the
    /// watch also fires when the holder's lease runs out.
    async fn watch_release(&self, key: &str) -> ReleaseWatch {
        let now = Instant::now();
        let mut state = self.state.lock();
        let expires = state.live(key, now).and_then(|e| e.expires);
        let rx = self.notifier.watch(key);
        drop(state);
        ReleaseWatch::notified(rx, expires)
    }

    fn handed_off_at(&self, key: &str) -> Option<Instant> {
        self.notifier.handed_off_at(key)
    }

    fn atomic_token_ops(&self) -> bool {
        true
    }

    /// Entries expire on this process's tokio clock, to the nanosecond.
    fn exact_expiry(&self) -> bool {
        true
    }

    fn max_value_size(&self) -> usize {
        self.max_value_size
    }
}
