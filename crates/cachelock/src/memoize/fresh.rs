//! Freshness: the expiration policy, the envelope stored with each value,
//! the clock, XFetch early refresh, failure records, side keys and the
//! memoize metrics.
//!
//! # The envelope
//!
//! Every value's plaintext starts with a fixed 46-byte envelope (the item's
//! `FLAG_ENVELOPE` says so): created-at, fresh-until, the end of the
//! stale-while-revalidate window, the end of the stale-if-error window
//! (Unix milliseconds), the measured compute time Δ (an EWMA, in ms), and
//! the namespace generation seen when the compute started.
//!
//! The backend TTL is the hard limit: fresh + max(stale-while-revalidate,
//! stale-if-error).
//!
//! # Invalidation, and why a hit reads one key
//!
//! A hit is one read of **one key**, the value's own: everything that
//! invalidation needs a reader to know is folded into what is stored
//! there, rather than kept in side keys that every read would have to
//! fetch too (on the embedded backend fetching three keys cost 60 % more
//! than one, and on a server each extra key is bytes on every hit).
//!
//! * [`Cache::invalidate`](crate::Cache::invalidate) replaces the item by a
//!   *tombstone* (a tiny item with a random id, kept as long as the
//!   default expiration, 30 days): a miss for readers. One write.
//! * [`Cache::invalidate_soft`](crate::Cache::invalidate_soft) wraps the
//!   stored item in a *stale mark* (a byte, a random id, then the item's
//!   bytes unchanged, kept for the item's remaining TTL): readers strip it
//!   and treat the value as stale (served within its stale-while-revalidate
//!   window while one caller refreshes, else a miss). It reads the item and
//!   writes the marked one with a compare-and-set
//!   ([`Backend::set_if`](crate::Backend::set_if)), a few times if writers
//!   race it, then falls back to a tombstone (always allowed: it is the
//!   stronger invalidation). Two or three round trips (get, TTL, set).
//! * **Fenced write-back**: the leader of a compute remembers the raw
//!   bytes (or absence) of its last read of the value key (the re-read
//!   under the lock; a forced overwrite reads them first) and writes the
//!   final item (inline item or manifest) with `set_if(expected = those
//!   bytes)`. An invalidation during the compute changed them to a
//!   tombstone or a mark (both carry random ids, so they never repeat), so
//!   the old value is not stored: no old value is ever served as fresh. A
//!   manifest refused this way deletes its chunks (nothing can reach
//!   them). One exception: bytes read when already past their hard end
//!   (a coarse-TTL backend keeps them a little longer: Memcached up to
//!   about two seconds) may also be found gone, which is their expiry (on
//!   Memcached such a value often expires during the compute, and refusing
//!   then cost a second compute). That is safe because a soft invalidation
//!   of an item with less than 5 s left writes a tombstone, not a mark that
//!   would go with it. A cache that evicts a tombstone loses that
//!   invalidation, as it loses any key. A stream's
//!   producer writes its last item the same way, over its last read of the
//!   value key (so a stream invalidated while it was produced is not
//!   stored); a stale mark on a stream reads as a miss (streams have no
//!   stale window).
//! * [`Cache::invalidate_all`](crate::Cache::invalidate_all) bumps the
//!   namespace generation counter and every envelope records the
//!   generation its compute started under; a read fetches the counter with
//!   the value (same round trip, one more key) and an envelope of another
//!   generation is a miss. Because that key costs every read, it is opt-in:
//!   [`CacheBuilder::namespace_invalidation`](crate::CacheBuilder::namespace_invalidation).
//!
//! Entries of the format before this one (format version 1, whose envelope
//! held a per-key version read from a side key) are a clean miss and are
//! rebuilt.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::lock::check_duration;

/// How long memoized values are fresh, and what happens after: the
/// expiration policy of a [`Cache`](crate::Cache) or of one
/// [`Entry`](crate::Entry).
///
/// A plain [`Duration`] converts into `Expiration::fresh(d)`, which is
/// today's single TTL: the value is served until `d` has passed, then it is
/// gone and the next caller recomputes it under the lock.
///
/// ```
/// use std::time::Duration;
/// use cachelock::Expiration;
///
/// let policy = Expiration::fresh(Duration::from_secs(60))
///     .stale_while_revalidate(Duration::from_secs(600))
///     .stale_if_error(Duration::from_secs(3600))
///     .early_refresh(1.0);
/// assert_eq!(policy.fresh_for(), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Expiration {
    fresh: Duration,
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
    early_refresh: Option<f64>,
}

impl Expiration {
    /// Values are fresh for `d`; nothing is served stale.
    pub const fn fresh(d: Duration) -> Self {
        Self {
            fresh: d,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            early_refresh: None,
        }
    }

    /// For `d` after the fresh time a caller gets the old value at once,
    /// while one caller across all processes recomputes it (it takes the
    /// lock with one non-blocking attempt; the others do not wait). With
    /// [`try_get_with`](crate::Cache::try_get_with) the refresh runs **in
    /// that caller**, which returns the new value; with
    /// [`try_get_with_background`](crate::Cache::try_get_with_background)
    /// it runs in the background and that caller gets the old value at once
    /// too.
    #[must_use]
    pub const fn stale_while_revalidate(mut self, d: Duration) -> Self {
        self.stale_while_revalidate = d;
        self
    }

    /// For `d` after the fresh time, a caller whose compute fails (or that
    /// finds a shared failure record) gets the old value instead of the
    /// error.
    #[must_use]
    pub const fn stale_if_error(mut self, d: Duration) -> Self {
        self.stale_if_error = d;
        self
    }

    /// XFetch (Vattani et al., PVLDB 2015): a fresh hit is refreshed early
    /// with probability `exp(-t_left / (β · Δ))`, Δ being the measured
    /// compute time. The refresh is paired with a non-blocking lock attempt
    /// so it is still one compute; callers that lose get the value at once.
    /// `β` must be a finite number above 0 (1.0 is the paper's default).
    #[must_use]
    pub const fn early_refresh(mut self, beta: f64) -> Self {
        self.early_refresh = Some(beta);
        self
    }

    /// How long values are fresh.
    pub const fn fresh_for(&self) -> Duration {
        self.fresh
    }

    /// The stale-while-revalidate window.
    pub const fn stale_while_revalidate_for(&self) -> Duration {
        self.stale_while_revalidate
    }

    /// The stale-if-error window.
    pub const fn stale_if_error_for(&self) -> Duration {
        self.stale_if_error
    }

    /// XFetch's β, if early refresh is on.
    pub const fn early_refresh_beta(&self) -> Option<f64> {
        self.early_refresh
    }

    /// The backend TTL: fresh plus the longer window.
    pub(crate) fn hard_ttl(&self) -> Duration {
        self.fresh
            .saturating_add(self.stale_while_revalidate.max(self.stale_if_error))
    }

    /// Checks the durations and β.
    pub(crate) fn validate(&self) -> crate::Result<()> {
        check_duration("memoize expiration", self.fresh, false)?;
        check_duration("memoize expiration", self.hard_ttl(), false)?;
        if let Some(b) = self.early_refresh
            && !(b.is_finite() && b > 0.0)
        {
            return Err(Error::InvalidConfig(format!(
                "the early refresh β must be a finite number above 0, not {b}"
            )));
        }
        Ok(())
    }
}

impl From<Duration> for Expiration {
    fn from(d: Duration) -> Self {
        Self::fresh(d)
    }
}

/// Length of the encoded envelope.
pub(crate) const ENVELOPE_LEN: usize = 46;

/// Bytes of freshness envelope stored before each value's plaintext.
pub const ENVELOPE_OVERHEAD: usize = ENVELOPE_LEN;
const ENVELOPE_MAGIC: u8 = 0xE1;
const ENVELOPE_VERSION: u8 = 2;

/// The freshness header stored before a value's plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Envelope {
    pub(crate) created_ms: u64,
    pub(crate) fresh_until_ms: u64,
    pub(crate) stale_until_ms: u64,
    pub(crate) error_until_ms: u64,
    /// Measured compute time (EWMA), ms.
    pub(crate) delta_ms: u32,
    /// The namespace generation seen when the compute started.
    pub(crate) generation: u64,
}

impl Envelope {
    /// The envelope of a value computed now under `policy`, whose compute
    /// started under namespace generation `generation`.
    pub(crate) fn new(policy: &Expiration, now: u64, delta_ms: u32, generation: u64) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let fresh_until_ms = now.saturating_add(ms(policy.fresh));
        Self {
            created_ms: now,
            fresh_until_ms,
            stale_until_ms: fresh_until_ms.saturating_add(ms(policy.stale_while_revalidate)),
            error_until_ms: fresh_until_ms.saturating_add(ms(policy.stale_if_error)),
            delta_ms,
            generation,
        }
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.push(ENVELOPE_MAGIC);
        out.push(ENVELOPE_VERSION);
        for n in [
            self.created_ms,
            self.fresh_until_ms,
            self.stale_until_ms,
            self.error_until_ms,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&self.delta_ms.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
    }

    /// Splits the envelope off `plain`; `None` if it is not one.
    pub(crate) fn decode(plain: &[u8]) -> Option<(Self, &[u8])> {
        if plain.len() < ENVELOPE_LEN || plain[0] != ENVELOPE_MAGIC || plain[1] != ENVELOPE_VERSION
        {
            return None;
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&plain[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let mut d = [0u8; 4];
        d.copy_from_slice(&plain[34..38]);
        Some((
            Self {
                created_ms: u64_at(2),
                fresh_until_ms: u64_at(10),
                stale_until_ms: u64_at(18),
                error_until_ms: u64_at(26),
                delta_ms: u32::from_le_bytes(d),
                generation: u64_at(38),
            },
            &plain[ENVELOPE_LEN..],
        ))
    }

    /// The next Δ: an EWMA (weight ½) of the old one and `sample_ms`.
    pub(crate) fn next_delta(old: Option<u32>, sample: Duration) -> u32 {
        let s = u32::try_from(sample.as_millis()).unwrap_or(u32::MAX);
        match old {
            Some(o) if o > 0 => ((u64::from(o) + u64::from(s)) / 2) as u32,
            _ => s,
        }
    }
}

/// What a read value's envelope says, now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Serve it.
    Fresh,
    /// Fresh, but XFetch chose this read to refresh early.
    Early,
    /// Past fresh (or soft-invalidated), within the stale window: serve it,
    /// one caller refreshes.
    Stale,
    /// Past the stale window: a miss, but usable with stale-if-error (until
    /// `error_until`) and for [`OnLockFailure::ServeStale`](super::OnLockFailure::ServeStale).
    Expired,
    /// Another namespace generation: a clean miss.
    Gone,
}

/// Classifies `env` at `now` (read only if needed). `generation` is the
/// namespace generation read with the value (`None`: namespace
/// invalidation is off), `marked` whether the value carries a stale mark
/// (soft invalidation), `within_ttl` whether the backend's own expiry
/// check is on this clock ([`Backend::exact_expiry`](crate::Backend::exact_expiry)):
/// a value whose fresh time is its whole TTL is then fresh without a
/// second clock read. `beta` and `u` (uniform in (0, 1]) drive XFetch.
pub(crate) fn classify(
    env: &Envelope,
    now: impl FnOnce() -> u64,
    within_ttl: bool,
    generation: Option<u64>,
    marked: bool,
    beta: Option<f64>,
    u: impl FnOnce() -> f64,
) -> State {
    if generation.is_some_and(|g| g != env.generation) {
        return State::Gone;
    }
    let single_ttl =
        env.stale_until_ms == env.fresh_until_ms && env.error_until_ms == env.fresh_until_ms;
    if !marked && within_ttl && single_ttl && beta.is_none() {
        return State::Fresh;
    }
    let now = now();
    if !marked && now < env.fresh_until_ms {
        if let Some(b) = beta
            && env.delta_ms > 0
            && xfetch(env.fresh_until_ms - now, env.delta_ms, b, u())
        {
            return State::Early;
        }
        return State::Fresh;
    }
    // Stale only within a stale window: a stale mark on a value without
    // one makes it a miss (not stale for the rest of its fresh time).
    if env.stale_until_ms > env.fresh_until_ms && now < env.stale_until_ms {
        State::Stale
    } else {
        State::Expired
    }
}

/// XFetch's rule: refresh iff `Δ·β·(−ln u) ≥ t_left`, `u` in (0, 1], so a
/// read with `t_left` ms left refreshes with probability
/// `exp(−t_left / (β·Δ))`. βΔ is capped at a minute.
pub fn xfetch(t_left_ms: u64, delta_ms: u32, beta: f64, u: f64) -> bool {
    let u = if u > 0.0 && u <= 1.0 { u } else { 1.0 };
    let bd = (f64::from(delta_ms) * beta).min(60_000.0);
    bd * -u.ln() >= t_left_ms as f64
}

/// The clock of envelopes: Unix milliseconds, advanced by
/// `tokio::time` (so paused-time tests move it) from a base read once per
/// process.
pub(crate) fn now_ms() -> u64 {
    static BASE: OnceLock<(u64, std::time::Instant)> = OnceLock::new();
    let (unix, at) = BASE.get_or_init(|| {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        (unix, std::time::Instant::now())
    });
    let elapsed = tokio::time::Instant::now()
        .into_std()
        .saturating_duration_since(*at);
    // Whole seconds and the milliseconds of the rest: no 128-bit division
    // (this is on every hit).
    let ms = elapsed
        .as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from(elapsed.subsec_millis()));
    unix.saturating_add(ms)
}

/// The handle's random source for behaviour (XFetch): SplitMix64, seeded
/// from the OS unless [`rng_seed`](crate::CacheBuilder::rng_seed) is set.
#[derive(Debug)]
pub(crate) struct Rng(Mutex<u64>);

impl Rng {
    pub(crate) fn new(seed: Option<u64>) -> Self {
        use rand::RngExt;
        Self(Mutex::new(seed.unwrap_or_else(|| rand::rng().random())))
    }

    /// Uniform in (0, 1].
    pub(crate) fn unit(&self) -> f64 {
        let mut s = self.0.lock();
        *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 53 random bits, shifted into (0, 1].
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// A compute failure shared through the cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct FailureRecord {
    /// The compute error, as text.
    pub(crate) message: String,
    /// Failed computes in this window.
    pub(crate) attempts: u32,
    /// When the window began (Unix ms).
    pub(crate) first_ms: u64,
    /// When the last failure was written (Unix ms).
    pub(crate) last_ms: u64,
}

/// A key derived from a value's full key: `{key}:#{suffix}` (at most 230
/// bytes, Memcached-safe when `key` is).
pub(crate) fn side_key(key: &str, suffix: &str) -> String {
    // The chunk keys' rule (`codec::chunk_key`): a long key keeps a prefix
    // and the SHA-256 of the whole; built in one allocation (this is on
    // every memoize hit).
    let mut out = if key.len() <= super::codec::CHUNK_KEY_KEEP {
        let mut out = String::with_capacity(key.len() + 2 + suffix.len());
        out.push_str(key);
        out
    } else {
        super::codec::long_key_stem(key)
    };
    out.push_str(":#");
    out.push_str(suffix);
    out
}

/// Memoize metric names (`metrics` facade counters and histograms).
pub(crate) mod metric {
    pub(crate) const HIT: &str = "cachelock_memoize_hits_total";
    pub(crate) const STALE_HIT: &str = "cachelock_memoize_stale_hits_total";
    pub(crate) const MISS: &str = "cachelock_memoize_misses_total";
    pub(crate) const REFRESH_STARTED: &str = "cachelock_memoize_refresh_started_total";
    pub(crate) const REFRESH_WON: &str = "cachelock_memoize_refresh_won_total";
    pub(crate) const REFRESH_LOST: &str = "cachelock_memoize_refresh_lost_total";
    pub(crate) const COMPUTE_SECONDS: &str = "cachelock_memoize_compute_seconds";
    pub(crate) const FAILURE_WRITTEN: &str = "cachelock_memoize_failure_records_written_total";
    pub(crate) const FAILURE_SERVED: &str = "cachelock_memoize_failure_records_served_total";
    pub(crate) const WAITS: &str = "cachelock_memoize_waits_total";
    pub(crate) const WAIT_SECONDS: &str = "cachelock_memoize_wait_seconds";
    pub(crate) const BYTES_PLAIN: &str = "cachelock_memoize_bytes_plain_total";
    pub(crate) const BYTES_STORED: &str = "cachelock_memoize_bytes_stored_total";

    pub(crate) fn inc(name: &'static str) {
        metrics::counter!(name).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip() {
        let p = Expiration::fresh(Duration::from_secs(1))
            .stale_while_revalidate(Duration::from_secs(2))
            .stale_if_error(Duration::from_secs(5));
        let e = Envelope::new(&p, 1000, 42, 9);
        let mut b = Vec::new();
        e.encode(&mut b);
        assert_eq!(b.len(), ENVELOPE_LEN);
        b.extend_from_slice(b"rest");
        let (d, rest) = Envelope::decode(&b).unwrap();
        assert_eq!(d, e);
        assert_eq!(rest, b"rest");
        assert_eq!(e.fresh_until_ms, 2000);
        assert_eq!(e.stale_until_ms, 4000);
        assert_eq!(e.error_until_ms, 7000);
    }

    #[test]
    fn classify_windows_marks_and_generations() {
        let p = Expiration::fresh(Duration::from_secs(1))
            .stale_while_revalidate(Duration::from_secs(1));
        let e = Envelope::new(&p, 0, 100, 0);
        let never = || 1.0;
        assert_eq!(
            classify(&e, || 500, false, None, false, None, never),
            State::Fresh
        );
        assert_eq!(
            classify(&e, || 1500, false, None, false, None, never),
            State::Stale
        );
        assert_eq!(
            classify(&e, || 2500, false, None, false, None, never),
            State::Expired
        );
        // Soft-invalidated: stale at once.
        assert_eq!(
            classify(&e, || 500, false, None, true, None, never),
            State::Stale
        );
        assert_eq!(
            classify(&e, || 500, false, Some(0), false, None, never),
            State::Fresh
        );
        assert_eq!(
            classify(&e, || 500, false, Some(1), false, None, never),
            State::Gone
        );
        // Checked by the backend's exact expiry: a single-TTL value is fresh
        // without reading the clock; one with a window still reads it.
        let clock = || -> u64 { panic!("the clock was read") };
        let single = Envelope::new(&Expiration::fresh(Duration::from_secs(1)), 0, 0, 0);
        assert_eq!(
            classify(&single, clock, true, None, false, None, never),
            State::Fresh
        );
        // Soft-invalidated without a stale window: a miss.
        assert_eq!(
            classify(&single, || 500, true, None, true, None, never),
            State::Expired
        );
        assert_eq!(
            classify(&e, || 1500, true, None, false, None, never),
            State::Stale
        );
        // u close to 0: -ln u is large, so XFetch fires.
        assert_eq!(
            classify(&e, || 500, false, None, false, Some(1.0), || 1e-9),
            State::Early
        );
        assert_eq!(
            classify(&e, || 500, false, None, false, Some(1.0), never),
            State::Fresh
        );
    }

    #[test]
    fn xfetch_probability_matches_the_formula() {
        // p(t) = exp(-t/(βΔ)); Δ = 400 ms, β = 1, t = 400 ms: 36.8 %.
        let rng = Rng::new(Some(7));
        let n = 200_000;
        let hits = (0..n).filter(|_| xfetch(400, 400, 1.0, rng.unit())).count();
        let p = hits as f64 / n as f64;
        assert!((p - (-1.0f64).exp()).abs() < 0.005, "p = {p}");
        let hits = (0..n)
            .filter(|_| xfetch(1000, 400, 1.0, rng.unit()))
            .count();
        let p = hits as f64 / n as f64;
        assert!((p - (-2.5f64).exp()).abs() < 0.005, "p = {p}");
    }

    #[test]
    fn rng_is_in_the_half_open_unit_interval() {
        let r = Rng::new(Some(0));
        for _ in 0..10_000 {
            let u = r.unit();
            assert!(u > 0.0 && u <= 1.0);
        }
    }

    #[test]
    fn side_keys() {
        assert_eq!(side_key("ns:k", "f"), "ns:k:#f");
        let long = "x".repeat(400);
        assert!(side_key(&long, "f").len() <= 230);
        assert!(side_key(&long, "f").ends_with(":#f"));
        // The same keys as the chunk-key form they were first derived from
        // (stored side keys stay valid).
        for key in ["ns:k".to_owned(), long, "é".repeat(150)] {
            let chunk = crate::memoize::codec::chunk_key(&key, 0, 0);
            let stem = chunk.strip_suffix(":#0000000000000000:0").unwrap();
            assert_eq!(side_key(&key, "gen"), format!("{stem}:#gen"));
        }
    }
}
