//! Memoize cases written once over `SharedBackend`, fanned out over backends
//! by [`memoize_tests!`], plus the test doubles they use: a wrapper backend
//! that records operations, can inject failures and can yield before each
//! operation (to interleave concurrent writers), and a log capture.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cachelock::{
    AddRead, Backend, BackendError, BackendResult, CacheKey, CacheLock, KeyBuilder, LockAdd,
    LockOptions, MemoizeError, OnLockFailure, SharedBackend, TokenCheck,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub use super::opts::{Opts, memoize, memoize_iter};
use super::unique_key;

/// Expands every memoize case into a test for one backend, as
/// [`conformance_tests!`](crate::conformance_tests) does (the same arguments).
#[macro_export]
macro_rules! memoize_tests {
    ($make:expr, paused = $paused:tt $(, #[$attr:meta])*) => {
        $crate::memoize_tests!(@cases $make, $paused, [$(#[$attr])*];
            compute_once_then_hit, unicode_and_non_string_values, stored_none_is_a_hit,
            exactly_two_chunks, two_chunks_plus_one_byte, compressed_values,
            preloaded_entries_read_without_computing, missing_chunk_recomputes_once,
            encryption_round_trip, different_encryption_key_misses, encrypted_non_string_chunked,
            get_error_still_returns_value, set_error_still_returns_value,
            lock_not_taken_on_hit, lock_held_during_compute_and_released,
            value_appearing_while_waiting_is_returned, lock_timeout_computes_and_keeps_other_lock,
            lock_timeout_fail_option, expired_lease_is_taken_over, compute_error_caches_nothing,
            force_overwrite_takes_the_lock, corrupt_entry_rebuilt_under_lock,
            concurrent_callers_compute_once, concurrent_processes_compute_once,
            racing_writers_never_mix, hostile_manifest_is_a_miss, unknown_version_is_a_miss,
            wrong_type_is_a_miss, cold_miss_reads_with_the_lock);
    };
    (@cases $make:expr, $paused:tt, $attrs:tt; $($case:ident),*) => {
        $(
            $crate::memoize_tests!(@attrs $attrs
            #[tokio::test(flavor = "current_thread", start_paused = $paused)]
            async fn $case() {
                common::logs::init();
                let backend: cachelock::SharedBackend = $make;
                common::memoize_cases::$case(backend).await;
            });
        )*
    };
    (@attrs [$(#[$attr:meta])*] $($item:tt)*) => {
        $(#[$attr])* $($item)*
    };
}

/// One operation seen by [`Wrap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Get(String),
    GetMany(Vec<String>),
    Set(String, usize),
    SetMany(Vec<String>),
    Add(String),
    /// `add_reading` of the lock key, reading these keys.
    AddReading(String, Vec<String>),
    Touch(String),
    Delete(String),
    ExtendIfEq(String),
    DeleteIfEq(String),
}

/// A test double of the cache: delegates to a real backend, records every
/// operation, and can fail reads or writes or yield before each operation.
#[derive(Debug)]
pub struct Wrap {
    pub inner: SharedBackend,
    pub ops: Mutex<Vec<Op>>,
    pub fail_get: AtomicBool,
    pub fail_set: AtomicBool,
    pub yield_first: AtomicBool,
}

impl Wrap {
    pub fn new(inner: SharedBackend) -> Arc<Self> {
        Arc::new(Self {
            inner,
            ops: Mutex::new(Vec::new()),
            fail_get: AtomicBool::new(false),
            fail_set: AtomicBool::new(false),
            yield_first: AtomicBool::new(false),
        })
    }

    pub fn shared(self: &Arc<Self>) -> SharedBackend {
        self.clone()
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().clone()
    }

    pub fn clear(&self) {
        self.ops.lock().clear();
    }

    /// Every chunk key written with `set_many`, in order.
    pub fn chunk_keys(&self) -> Vec<String> {
        self.ops()
            .into_iter()
            .filter_map(|op| match op {
                Op::SetMany(keys) => Some(keys),
                _ => None,
            })
            .flatten()
            .collect()
    }

    pub fn count(&self, pred: impl Fn(&Op) -> bool) -> usize {
        self.ops.lock().iter().filter(|op| pred(op)).count()
    }

    async fn before(&self, op: Op) {
        if self.yield_first.load(Ordering::Relaxed) {
            tokio::task::yield_now().await;
        }
        self.ops.lock().push(op);
    }

    fn get_fails(&self, key: &str) -> BackendResult<()> {
        if self.fail_get.load(Ordering::Relaxed) {
            return Err(BackendError::unavailable(key, "injected read failure"));
        }
        Ok(())
    }

    fn set_fails(&self, key: &str) -> BackendResult<()> {
        if self.fail_set.load(Ordering::Relaxed) {
            return Err(BackendError::unavailable(key, "injected write failure"));
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for Wrap {
    async fn get(&self, key: &str) -> BackendResult<Option<Bytes>> {
        self.before(Op::Get(key.into())).await;
        self.get_fails(key)?;
        self.inner.get(key).await
    }
    async fn get_many(&self, keys: &[&str]) -> BackendResult<Vec<Option<Bytes>>> {
        self.before(Op::GetMany(keys.iter().map(|k| (*k).into()).collect()))
            .await;
        self.get_fails(keys.first().copied().unwrap_or(""))?;
        self.inner.get_many(keys).await
    }
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<()> {
        self.before(Op::Set(key.into(), value.len())).await;
        self.set_fails(key)?;
        self.inner.set(key, value, ttl).await
    }
    /// Recorded as a `Set` (it writes the key when it stores).
    async fn set_if(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Duration,
    ) -> BackendResult<bool> {
        self.before(Op::Set(key.into(), value.len())).await;
        self.set_fails(key)?;
        self.inner.set_if(key, expected, value, ttl).await
    }
    async fn set_many(&self, items: &[(&str, &[u8])], ttl: Duration) -> BackendResult<()> {
        self.before(Op::SetMany(
            items.iter().map(|(k, _)| (*k).into()).collect(),
        ))
        .await;
        self.set_fails(items.first().map_or("", |(k, _)| *k))?;
        self.inner.set_many(items, ttl).await
    }
    async fn add(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<bool> {
        self.before(Op::Add(key.into())).await;
        self.inner.add(key, value, ttl).await
    }
    /// The inner backend's (one round trip where it can); a read failure
    /// is injected into the values only.
    async fn add_reading(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        add: LockAdd,
        keys: &[&str],
    ) -> BackendResult<AddRead> {
        self.before(Op::AddReading(
            key.into(),
            keys.iter().map(|k| (*k).into()).collect(),
        ))
        .await;
        let mut r = self.inner.add_reading(key, value, ttl, add, keys).await?;
        if let Err(e) = self.get_fails(keys.first().copied().unwrap_or("")) {
            r.values = Err(e);
        }
        Ok(r)
    }
    async fn touch(&self, key: &str, ttl: Duration) -> BackendResult<bool> {
        self.before(Op::Touch(key.into())).await;
        self.inner.touch(key, ttl).await
    }
    async fn delete(&self, key: &str) -> BackendResult<bool> {
        self.before(Op::Delete(key.into())).await;
        self.inner.delete(key).await
    }
    async fn incr(&self, key: &str, delta: u64) -> BackendResult<u64> {
        self.inner.incr(key, delta).await
    }
    async fn delete_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        hold: Duration,
    ) -> BackendResult<TokenCheck> {
        self.before(Op::DeleteIfEq(key.into())).await;
        self.inner.delete_if_eq(key, expected, hold).await
    }
    async fn extend_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        ttl: Duration,
    ) -> BackendResult<TokenCheck> {
        self.before(Op::ExtendIfEq(key.into())).await;
        self.inner.extend_if_eq(key, expected, ttl).await
    }
    async fn ttl(&self, key: &str) -> BackendResult<Option<Duration>> {
        self.inner.ttl(key).await
    }
    fn atomic_token_ops(&self) -> bool {
        self.inner.atomic_token_ops()
    }
    fn max_value_size(&self) -> usize {
        self.inner.max_value_size()
    }
}

/// Captured cachelock `tracing` output of the current thread while the
/// guard lives (a thin wrapper over [`super::logs`], which also holds the
/// workaround for tracing's callsite-interest race).
pub struct Logs {
    logs: super::logs::Logs,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Logs {
    pub fn capture() -> Self {
        let (logs, _guard) = super::logs::capture();
        Self { logs, _guard }
    }

    pub fn text(&self) -> String {
        self.logs.lines().join("\n")
    }
}

/// A compute that counts its calls.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rich {
    pub id: u64,
    pub name: String,
    pub tags: Vec<String>,
    pub score: f64,
    pub nested: Option<Box<Rich>>,
    pub map: std::collections::BTreeMap<String, i32>,
}

pub fn rich() -> Rich {
    Rich {
        id: 7,
        name: "naïve café 🥳".into(),
        tags: vec!["a".into(), "ß".into()],
        score: -1.5,
        nested: Some(Box::new(Rich {
            id: 8,
            name: String::new(),
            tags: vec![],
            score: 0.0,
            nested: None,
            map: Default::default(),
        })),
        map: [("x".to_string(), 1), ("y".to_string(), -2)]
            .into_iter()
            .collect(),
    }
}

pub type Never = std::io::Error;

/// Memoize with a compute that counts calls and returns `value`.
pub async fn mz<T>(b: &SharedBackend, key: &str, o: &Opts, c: &Counter, value: T) -> T
where
    T: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    memoize(b, key, o, || async {
        c.hit();
        Ok::<_, Never>(value)
    })
    .await
    .unwrap()
}

/// A string whose postcard encoding is exactly `n` bytes (n >= 130).
pub fn string_encoding_to(n: usize, ch: char) -> String {
    // 2-byte varint length for lengths 128..16384.
    assert!((130..16386).contains(&n));
    std::iter::repeat_n(ch, n - 2).collect()
}

/// Options for tests on shared servers: values expire after 10 minutes
/// (not the default 30 days).
pub fn opts() -> Opts {
    Opts::new().expiration(Duration::from_secs(600))
}

/// How a memoize lock of a case waits.
#[derive(Debug, Clone, Copy)]
pub enum Wait {
    /// One attempt.
    Once,
    /// Without limit.
    Forever,
    /// Up to this long.
    Timeout(Duration),
}

const SMALL_CHUNK: usize = 256;

fn segment() -> usize {
    SMALL_CHUNK - cachelock::memoize::CHUNK_OVERHEAD
}

fn small_chunks() -> Opts {
    opts().chunk_size(SMALL_CHUNK).compression(false)
}

pub fn lock_opts(wait: Wait) -> LockOptions {
    let o = LockOptions::new()
        .lease(Duration::from_secs(10))
        .retry_interval(Duration::from_millis(20));
    match wait {
        Wait::Once => o.max_wait(Duration::ZERO),
        Wait::Forever => o,
        Wait::Timeout(d) => o.max_wait(d),
    }
}

pub async fn compute_once_then_hit(b: SharedBackend) {
    let k = unique_key("once");
    let o = opts();
    let c = Counter::default();
    assert_eq!(mz(&b, &k, &o, &c, "abc123".to_string()).await, "abc123");
    assert_eq!(mz(&b, &k, &o, &c, "other".to_string()).await, "abc123");
    assert_eq!(c.get(), 1);
    // Stored inline: a hit is one round trip, a `get` of the value's key
    // alone (invalidation is folded into what is stored there).
    let w = Wrap::new(b.clone());
    assert_eq!(mz(&w.shared(), &k, &o, &c, String::new()).await, "abc123");
    assert_one_read(&w.ops(), &k);
}

pub async fn unicode_and_non_string_values(b: SharedBackend) {
    let o = opts();
    let c = Counter::default();
    let k = unique_key("unicode");
    let s = "ℝ𝓊𝓈𝓉 🦀 — ünïcödé".to_string();
    assert_eq!(mz(&b, &k, &o, &c, s.clone()).await, s);
    assert_eq!(mz(&b, &k, &o, &c, String::new()).await, s);
    let k = unique_key("rich");
    assert_eq!(mz(&b, &k, &o, &c, rich()).await, rich());
    let other = Rich { id: 0, ..rich() };
    assert_eq!(mz(&b, &k, &o, &c, other).await, rich());
    let k = unique_key("ints");
    assert_eq!(
        mz(&b, &k, &o, &c, vec![1i64, -2, i64::MAX]).await,
        vec![1, -2, i64::MAX]
    );
    assert_eq!(mz(&b, &k, &o, &c, vec![0i64]).await, vec![1, -2, i64::MAX]);
    assert_eq!(c.get(), 3);
    // A unicode key.
    let k = unique_key("ключ🥳");
    assert_eq!(mz(&b, &k, &o, &c, (1u8, 'é')).await, (1, 'é'));
    assert_eq!(mz(&b, &k, &o, &c, (2u8, 'x')).await, (1, 'é'));
    assert_eq!(c.get(), 4);
}

pub async fn stored_none_is_a_hit(b: SharedBackend) {
    let k = unique_key("none");
    let o = opts();
    let c = Counter::default();
    assert_eq!(mz::<Option<u32>>(&b, &k, &o, &c, None).await, None);
    assert_eq!(mz(&b, &k, &o, &c, Some(5u32)).await, None);
    assert_eq!(c.get(), 1);
}

async fn chunk_case(b: SharedBackend, plain_len: usize, chunks: usize) {
    let w = Wrap::new(b);
    let b = w.shared();
    let k = unique_key("chunks");
    let o = small_chunks();
    let c = Counter::default();
    // The stored plaintext is the envelope, then the value.
    let v = string_encoding_to(plain_len - cachelock::ENVELOPE_OVERHEAD, 'x');
    assert_eq!(mz(&b, &k, &o, &c, v.clone()).await, v);
    let written = w.chunk_keys();
    assert_eq!(written.len(), chunks, "{written:?}");
    // One batch of chunks, then the manifest last.
    let sets: Vec<Op> = w
        .ops()
        .into_iter()
        .filter(|op| matches!(op, Op::Set(..) | Op::SetMany(_)))
        .collect();
    assert_eq!(sets.len(), 2, "{sets:?}");
    assert!(matches!(&sets[1], Op::Set(key, len) if *key == k && *len < 128));
    for key in &written {
        assert!(key.starts_with(&k), "{key}");
        assert!(key.len() <= 250);
    }
    w.clear();
    assert_eq!(mz(&b, &k, &o, &c, String::new()).await, v);
    assert_eq!(c.get(), 1);
    // Manifest then all chunks in one get_many.
    let ops = w.ops();
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert!(matches!(&ops[1], Op::GetMany(keys) if keys.len() == chunks));
}

pub async fn exactly_two_chunks(b: SharedBackend) {
    chunk_case(b, 2 * segment(), 2).await;
}

pub async fn two_chunks_plus_one_byte(b: SharedBackend) {
    chunk_case(b, 2 * segment() + 1, 3).await;
}

pub async fn compressed_values(b: SharedBackend) {
    let w = Wrap::new(b);
    let b = w.shared();
    let c = Counter::default();
    // Compresses to one inline item although it is 100 kB.
    let k = unique_key("compressed");
    let v = "abcdefgh".repeat(12_500);
    let o = opts().compression(true);
    assert_eq!(mz(&b, &k, &o, &c, v.clone()).await, v);
    let stored = w.inner.get(&k).await.unwrap().unwrap();
    assert!(stored.len() < 2_000, "{} bytes stored", stored.len());
    assert!(w.chunk_keys().is_empty());
    assert_eq!(mz(&b, &k, &o, &c, String::new()).await, v);
    // Read by a caller whose setting differs: the format says how it was written.
    assert_eq!(
        mz(&b, &k, &o.clone().compression(false), &c, String::new()).await,
        v
    );
    // Chunked and compressed.
    let k = unique_key("compressed-chunks");
    let o = opts().chunk_size(1024).compression(true);
    let v: String = (0..5_000)
        .map(|i| char::from(b'a' + (i % 7) as u8))
        .collect();
    w.clear();
    assert_eq!(mz(&b, &k, &o, &c, v.clone()).await, v);
    let chunks = w.chunk_keys();
    assert!(chunks.len() >= 2);
    let got = w
        .inner
        .get_many(&chunks.iter().map(String::as_str).collect::<Vec<_>>())
        .await
        .unwrap();
    let stored: usize = got.iter().map(|v| v.as_ref().unwrap().len()).sum();
    assert!(stored < v.len() / 2, "{stored} bytes for {}", v.len());
    assert_eq!(mz(&b, &k, &o, &c, String::new()).await, v);
    assert_eq!(c.get(), 2);
}

pub async fn preloaded_entries_read_without_computing(b: SharedBackend) {
    // Entries written earlier (by another caller, with other settings) are
    // read without calling compute.
    for (o, v) in [
        (opts(), "small".to_string()),
        (small_chunks(), "y".repeat(3_000)),
        (opts().chunk_size(SMALL_CHUNK), "z".repeat(50_000)),
    ] {
        let k = unique_key("preloaded");
        let c = Counter::default();
        mz(&b, &k, &o, &c, v.clone()).await;
        let got: String = memoize(&b, k.as_str(), &o, || async {
            Err::<String, _>("must not be called")
        })
        .await
        .unwrap();
        assert_eq!(got, v);
    }
}

pub async fn missing_chunk_recomputes_once(b: SharedBackend) {
    let w = Wrap::new(b);
    let b = w.shared();
    let k = unique_key("missing-chunk");
    let o = small_chunks();
    let c = Counter::default();
    let v = "q".repeat(1_000);
    mz(&b, &k, &o, &c, v.clone()).await;
    let chunks = w.chunk_keys();
    assert!(chunks.len() >= 3);
    assert!(w.inner.delete(&chunks[1]).await.unwrap());
    let logs = Logs::capture();
    assert_eq!(mz(&b, &k, &o, &c, v.clone()).await, v);
    assert_eq!(c.get(), 2);
    assert!(logs.text().contains("missing chunk"), "{}", logs.text());
    assert_eq!(mz(&b, &k, &o, &c, String::new()).await, v);
    assert_eq!(c.get(), 2);
}

pub async fn encryption_round_trip(b: SharedBackend) {
    let k = unique_key("enc");
    let o = opts().encryption_key(b"0123456789abcdef");
    let c = Counter::default();
    let v = "secret text".to_string();
    assert_eq!(mz(&b, &k, &o, &c, v.clone()).await, v);
    assert_eq!(mz(&b, &k, &o, &c, String::new()).await, v);
    assert_eq!(c.get(), 1);
    // The key is the HMAC form and neither key nor value leak.
    let full = o.full_key(&CacheKey::from(k.as_str()));
    assert_eq!(
        full,
        KeyBuilder::default()
            .secret(b"0123456789abcdef".to_vec())
            .build(k.as_str())
    );
    assert_eq!(full.len(), 64);
    assert!(b.get(&k).await.unwrap().is_none());
    let stored = b.get(&full).await.unwrap().unwrap();
    assert!(!stored.windows(6).any(|w| w == b"secret"));
    // Without the key it is a miss (another key name, and the data is
    // refused if read under that name).
    let plain = opts().key_secret(b"0123456789abcdef");
    assert_eq!(plain.full_key(&CacheKey::from(k.as_str())), full);
    assert_eq!(
        mz(&b, &k, &plain, &c, "recomputed".to_string()).await,
        "recomputed"
    );
    assert_eq!(c.get(), 2);
}

pub async fn different_encryption_key_misses(b: SharedBackend) {
    let k = unique_key("enc-other");
    // Same key names (explicit secret), different encryption keys.
    let o1 = opts()
        .namespace("ns")
        .key_secret(b"names")
        .encryption_key(b"key-one");
    let o2 = opts()
        .namespace("ns")
        .key_secret(b"names")
        .encryption_key(b"key-two");
    assert_eq!(
        o1.full_key(&k.as_str().into()),
        o2.full_key(&k.as_str().into())
    );
    let c = Counter::default();
    mz(&b, &k, &o1, &c, 1u32).await;
    let logs = Logs::capture();
    assert_eq!(mz(&b, &k, &o2, &c, 2u32).await, 2);
    assert!(logs.text().contains("decryption failed"), "{}", logs.text());
    assert_eq!(c.get(), 2);
    assert_eq!(mz(&b, &k, &o2, &c, 3u32).await, 2);
    assert_eq!(mz(&b, &k, &o1, &c, 4u32).await, 4);
    assert_eq!(c.get(), 3);
}

pub async fn encrypted_non_string_chunked(b: SharedBackend) {
    let k = unique_key("enc-chunks");
    let o = opts()
        .chunk_size(SMALL_CHUNK)
        .encryption_key(b"0123456789abcdef");
    let c = Counter::default();
    let v: Vec<Rich> = (0..40).map(|i| Rich { id: i, ..rich() }).collect();
    assert_eq!(mz(&b, &k, &o, &c, v.clone()).await, v);
    assert_eq!(mz(&b, &k, &o, &c, Vec::<Rich>::new()).await, v);
    assert_eq!(c.get(), 1);
}

pub async fn get_error_still_returns_value(b: SharedBackend) {
    let w = Wrap::new(b);
    let b = w.shared();
    let k = unique_key("get-error");
    let o = opts();
    let c = Counter::default();
    w.fail_get.store(true, Ordering::Relaxed);
    let logs = Logs::capture();
    assert_eq!(mz(&b, &k, &o, &c, 5u8).await, 5);
    assert!(
        logs.text().contains("Error fetching data from cache"),
        "{}",
        logs.text()
    );
    assert!(logs.text().contains(&k));
    assert!(logs.text().contains("ERROR"));
    // It was still stored.
    w.fail_get.store(false, Ordering::Relaxed);
    assert_eq!(mz(&b, &k, &o, &c, 6u8).await, 5);
    assert_eq!(c.get(), 1);
}

pub async fn set_error_still_returns_value(b: SharedBackend) {
    let w = Wrap::new(b);
    let b = w.shared();
    let o = opts();
    for (k, o) in [
        (unique_key("set-error"), o),
        (unique_key("set-many-error"), small_chunks()),
    ] {
        let c = Counter::default();
        w.fail_set.store(true, Ordering::Relaxed);
        let logs = Logs::capture();
        let v = "v".repeat(600);
        assert_eq!(mz(&b, &k, &o, &c, v.clone()).await, v);
        let text = logs.text();
        assert!(
            text.contains("Error setting data in cache")
                || text.contains("Unable to store cached data"),
            "{text}"
        );
        assert!(text.contains(&k));
        w.fail_set.store(false, Ordering::Relaxed);
        // Nothing was stored: computed again.
        assert_eq!(mz(&b, &k, &o, &c, v.clone()).await, v);
        assert_eq!(c.get(), 2);
        assert!(w.inner.get(&k).await.unwrap().is_some());
    }
}

pub async fn lock_not_taken_on_hit(b: SharedBackend) {
    let w = Wrap::new(b);
    let b = w.shared();
    let k = unique_key("lock-hit");
    let o = opts().lock(lock_opts(Wait::Forever));
    let c = Counter::default();
    mz(&b, &k, &o, &c, 1u8).await;
    assert_eq!(
        w.count(|op| matches!(op, Op::Add(_) | Op::AddReading(..))),
        1
    );
    w.clear();
    assert_eq!(mz(&b, &k, &o, &c, 2u8).await, 1);
    assert_one_read(&w.ops(), &k);
}

/// A hit: exactly one `get_many` of the value with its fence keys.
fn assert_one_read(ops: &[Op], k: &str) {
    match ops {
        [Op::Get(key)] => assert_eq!(key, k),
        other => panic!("a hit should be one get of the value's key, not {other:?}"),
    }
}

pub async fn lock_held_during_compute_and_released(b: SharedBackend) {
    let k = unique_key("lock-held");
    let o = opts().lock(lock_opts(Wait::Forever));
    let lock_key = o.full_lock_key(&k.as_str().into());
    assert_eq!(lock_key, format!("_lock_:{k}"));
    let seen = Arc::new(Mutex::new(None));
    let v: u32 = memoize(&b, k.as_str(), &o, || {
        let (b, lock_key, seen) = (b.clone(), lock_key.clone(), seen.clone());
        async move {
            *seen.lock() = b.get(&lock_key).await.unwrap();
            Ok::<_, Never>(9)
        }
    })
    .await
    .unwrap();
    assert_eq!(v, 9);
    let token = seen
        .lock()
        .clone()
        .expect("the lock key holds a token during compute");
    let holder = cachelock::Holder::parse(&token);
    assert_eq!(holder.token.len(), 36, "a UUID token");
    assert_eq!(holder.pid, Some(std::process::id()), "and who holds it");
    assert_eq!(b.get(&lock_key).await.unwrap(), None, "released after");
}

pub async fn value_appearing_while_waiting_is_returned(b: SharedBackend) {
    let k = unique_key("appears");
    let o = opts().lock(lock_opts(Wait::Timeout(Duration::from_secs(20))));
    let other = CacheLock::new(
        b.clone(),
        o.full_lock_key(&k.as_str().into()),
        lock_opts(Wait::Once),
    )
    .unwrap();
    let held = other.acquire().await.unwrap();
    let c = Counter::default();
    let waiter = {
        let (b, k, o, c) = (b.clone(), k.clone(), o.clone(), c.clone());
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let v = mz(&b, &k, &o, &c, 0u32).await;
            (v, start.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The holder stores the value (through another handle, as another
    // process would) and keeps its lock.
    let elsewhere = Wrap::new(b.clone()).shared();
    let c2 = Counter::default();
    let stored_at = tokio::time::Instant::now();
    mz(&elsewhere, &k, &opts(), &c2, 42u32).await;
    let (v, waited) = waiter.await.unwrap();
    assert_eq!(v, 42);
    assert_eq!(c.get(), 0, "the waiter did not compute");
    // Served promptly after the value appeared, not after the lock.
    assert!(
        waited < Duration::from_millis(300) + stored_at.elapsed() + Duration::from_millis(100),
        "{waited:?}"
    );
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    assert!(!held.is_lost());
    assert_eq!(held.release().await.unwrap(), cachelock::Released::Released);
}

pub async fn lock_timeout_computes_and_keeps_other_lock(b: SharedBackend) {
    let k = unique_key("timeout");
    let o = opts().lock(lock_opts(Wait::Timeout(Duration::from_millis(200))));
    let lock_key = o.full_lock_key(&k.as_str().into());
    let other = CacheLock::new(b.clone(), lock_key.clone(), lock_opts(Wait::Once)).unwrap();
    let held = other.acquire().await.unwrap();
    let c = Counter::default();
    let logs = Logs::capture();
    assert_eq!(mz(&b, &k, &o, &c, 3u8).await, 3);
    assert_eq!(c.get(), 1);
    let text = logs.text();
    assert!(
        text.contains("Timeout waiting on distributed cache lock"),
        "{text}"
    );
    assert!(text.contains("ERROR"));
    // The other holder's lock is untouched.
    assert_eq!(
        b.get(&lock_key)
            .await
            .unwrap()
            .map(|v| cachelock::Holder::parse(&v).token)
            .as_deref(),
        Some(held.token())
    );
    assert_eq!(held.release().await.unwrap(), cachelock::Released::Released);
    // The value computed without the lock was stored.
    assert_eq!(mz(&b, &k, &o, &c, 4u8).await, 3);
}

pub async fn lock_timeout_fail_option(b: SharedBackend) {
    let k = unique_key("timeout-fail");
    let o = opts()
        .lock(lock_opts(Wait::Timeout(Duration::from_millis(100))))
        .on_lock_failure(OnLockFailure::Fail);
    let other = CacheLock::new(
        b.clone(),
        o.full_lock_key(&k.as_str().into()),
        lock_opts(Wait::Once),
    )
    .unwrap();
    let held = other.acquire().await.unwrap();
    let c = Counter::default();
    let r = memoize(&b, k.as_str(), &o, || async {
        c.hit();
        Ok::<_, Never>(1u8)
    })
    .await;
    match r {
        Err(MemoizeError::Lock(e)) => assert!(e.is_timed_out(), "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.get(), 0);
    // No wait + Fail: one attempt, then a timeout.
    let o = o.lock(lock_opts(Wait::Once));
    let r = memoize(&b, k.as_str(), &o, || async { Ok::<_, Never>(1u8) }).await;
    assert!(
        matches!(r, Err(MemoizeError::Lock(ref e)) if e.is_timed_out()),
        "{r:?}"
    );
    let _ = held.release().await.unwrap();
}

pub async fn expired_lease_is_taken_over(b: SharedBackend) {
    let k = unique_key("expired");
    let o = opts().lock(lock_opts(Wait::Timeout(Duration::from_secs(10))));
    let other = CacheLock::new(
        b.clone(),
        o.full_lock_key(&k.as_str().into()),
        lock_opts(Wait::Once).lease(Duration::from_secs(1)),
    )
    .unwrap();
    other.acquire().await.unwrap().forget();
    let c = Counter::default();
    let start = tokio::time::Instant::now();
    assert_eq!(mz(&b, &k, &o, &c, 11u8).await, 11);
    assert_eq!(c.get(), 1);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

pub async fn compute_error_caches_nothing(b: SharedBackend) {
    let k = unique_key("compute-error");
    let o = opts().lock(lock_opts(Wait::Forever));
    let lock_key = o.full_lock_key(&k.as_str().into());
    let r: Result<u8, _> = memoize(&b, k.as_str(), &o, || async {
        Err(std::io::Error::other("boom"))
    })
    .await;
    match r {
        Err(MemoizeError::Compute(e)) => assert_eq!(e.to_string(), "boom"),
        other => panic!("{other:?}"),
    }
    assert!(b.get(&k).await.unwrap().is_none());
    assert!(b.get(&lock_key).await.unwrap().is_none(), "lock released");
    let c = Counter::default();
    assert_eq!(mz(&b, &k, &o, &c, 2u8).await, 2);
    assert_eq!(c.get(), 1);
}

pub async fn force_overwrite_takes_the_lock(b: SharedBackend) {
    let k = unique_key("force");
    let c = Counter::default();
    mz(&b, &k, &opts(), &c, 1u8).await;
    let o = opts()
        .force_overwrite(true)
        .lock(lock_opts(Wait::Timeout(Duration::from_millis(100))))
        .on_lock_failure(OnLockFailure::Fail);
    let lock_key = o.full_lock_key(&k.as_str().into());
    // Lock free: computed under the lock, stored.
    let seen = Arc::new(AtomicBool::new(false));
    let v: u8 = memoize(&b, k.as_str(), &o, || {
        let (b, lock_key, seen) = (b.clone(), lock_key.clone(), seen.clone());
        async move {
            seen.store(b.get(&lock_key).await.unwrap().is_some(), Ordering::SeqCst);
            Ok::<_, Never>(2)
        }
    })
    .await
    .unwrap();
    assert_eq!(v, 2);
    assert!(seen.load(Ordering::SeqCst));
    assert_eq!(mz(&b, &k, &opts(), &c, 0u8).await, 2);
    // Lock held elsewhere: force_overwrite waits for it too.
    let other = CacheLock::new(b.clone(), lock_key, lock_opts(Wait::Once)).unwrap();
    let held = other.acquire().await.unwrap();
    let r = memoize(&b, k.as_str(), &o, || async { Ok::<_, Never>(3u8) }).await;
    assert!(matches!(r, Err(MemoizeError::Lock(_))), "{r:?}");
    let _ = held.release().await.unwrap();
}

pub async fn corrupt_entry_rebuilt_under_lock(b: SharedBackend) {
    let k = unique_key("corrupt");
    let o = opts().lock(lock_opts(Wait::Forever));
    let lock_key = o.full_lock_key(&k.as_str().into());
    b.set(
        &k,
        b"\x80\x03not a cachelock value",
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let logs = Logs::capture();
    let locked = Arc::new(AtomicBool::new(false));
    let v: String = memoize(&b, k.as_str(), &o, || {
        let (b, lock_key, locked) = (b.clone(), lock_key.clone(), locked.clone());
        async move {
            locked.store(b.get(&lock_key).await.unwrap().is_some(), Ordering::SeqCst);
            Ok::<_, Never>("fresh".to_string())
        }
    })
    .await
    .unwrap();
    assert_eq!(v, "fresh");
    assert!(locked.load(Ordering::SeqCst), "rebuilt under the lock");
    assert!(logs.text().contains("WARN"), "{}", logs.text());
    let c = Counter::default();
    assert_eq!(mz(&b, &k, &o, &c, String::new()).await, "fresh");
    assert_eq!(c.get(), 0);
}

async fn slow_compute(c: &Counter, v: u64) -> Result<u64, Never> {
    c.hit();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(v)
}

pub async fn concurrent_callers_compute_once(b: SharedBackend) {
    for lock in [false, true] {
        let k = unique_key("concurrent");
        let mut o = opts();
        if lock {
            o = o.lock(lock_opts(Wait::Forever));
        }
        let c = Counter::default();
        let calls = (0..64).map(|i| {
            let (b, k, o, c) = (b.clone(), k.clone(), o.clone(), c.clone());
            async move {
                memoize(
                    &b,
                    k.as_str(),
                    &o,
                    || async move { slow_compute(&c, i).await },
                )
                .await
                .unwrap()
            }
        });
        let results = futures_util::future::join_all(calls).await;
        assert_eq!(c.get(), 1, "lock = {lock}");
        assert!(results.iter().all(|v| *v == results[0]), "{results:?}");
    }
}

pub async fn concurrent_processes_compute_once(b: SharedBackend) {
    // 8 handles to the same cache stand for 8 processes (no shared
    // single-flight), 8 callers each: the lock plus value polling gives one
    // compute, and every caller is served soon after it is stored.
    let k = unique_key("processes");
    let o = opts().lock(lock_opts(Wait::Timeout(Duration::from_secs(10))));
    let c = Counter::default();
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for p in 0..8 {
        let handle = Wrap::new(b.clone()).shared();
        for i in 0..8 {
            let (h, k, o, c) = (handle.clone(), k.clone(), o.clone(), c.clone());
            tasks.push(tokio::spawn(async move {
                let v = memoize(&h, k.as_str(), &o, || async move {
                    slow_compute(&c, p * 100 + i).await
                })
                .await
                .unwrap();
                (v, start.elapsed())
            }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(c.get(), 1);
    let first = results[0].0;
    assert!(results.iter().all(|(v, _)| *v == first));
    let slowest = results.iter().map(|(_, d)| *d).max().unwrap();
    assert!(
        slowest < Duration::from_millis(200 + 100),
        "slowest caller served after {slowest:?}"
    );
}

pub async fn racing_writers_never_mix(b: SharedBackend) {
    let k = unique_key("race");
    let o = small_chunks().force_overwrite(true);
    let wa = Wrap::new(b.clone());
    let wb = Wrap::new(b.clone());
    wa.yield_first.store(true, Ordering::Relaxed);
    wb.yield_first.store(true, Ordering::Relaxed);
    let (ba, bb) = (wa.shared(), wb.shared());
    let va = "a".repeat(2_000);
    let vb = "b".repeat(2_000);
    let reader = opts();
    for _ in 0..20 {
        let c = Counter::default();
        let (ra, rb) = tokio::join!(
            mz(&ba, &k, &o, &c, va.clone()),
            mz(&bb, &k, &o, &c, vb.clone())
        );
        assert_eq!((ra.as_str(), rb.as_str()), (va.as_str(), vb.as_str()));
        let got = memoize(&b, k.as_str(), &reader, || async {
            Ok::<_, Never>("none".to_string())
        })
        .await
        .unwrap();
        assert!(
            got == va || got == vb,
            "mixed value read: {}",
            &got[..40.min(got.len())]
        );
    }
}

fn framed(content: &[u8]) -> Vec<u8> {
    let mut v = content.to_vec();
    v.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(content).to_le_bytes());
    v
}

pub async fn hostile_manifest_is_a_miss(b: SharedBackend) {
    #[derive(Serialize)]
    struct Body {
        total_len: u64,
        chunk_count: u32,
        segment_size: u32,
        write_id: u64,
        checksum: u64,
    }
    for (total_len, chunk_count, segment_size) in [
        (1_000_000_000u64 * 1_000, 1_000_000_000u32, 1_000u32),
        (u64::from(u32::MAX) * 64, u32::MAX, 64),
        (10, 1, u32::MAX),
        (5, 1, 0),
    ] {
        let k = unique_key("hostile");
        let mut content = vec![0xC1, 0x0C, cachelock::memoize::FORMAT_VERSION, 2, 0];
        content.extend(
            postcard::to_allocvec(&Body {
                total_len,
                chunk_count,
                segment_size,
                write_id: 1,
                checksum: 0,
            })
            .unwrap(),
        );
        b.set(&k, &framed(&content), Duration::from_secs(60))
            .await
            .unwrap();
        let c = Counter::default();
        assert_eq!(mz(&b, &k, &opts(), &c, 5u8).await, 5);
        assert_eq!(c.get(), 1);
        // Streams refuse it too, without fetching it all.
        let k = unique_key("hostile-stream");
        let mut content = content.clone();
        content[4] = 1 << 2;
        b.set(&k, &framed(&content), Duration::from_secs(60))
            .await
            .unwrap();
        let w = Wrap::new(b.clone());
        let items: Vec<u8> = futures_util::StreamExt::collect::<Vec<_>>(memoize_iter(
            &w.shared(),
            k.as_str(),
            &opts(),
            vec![Ok::<_, Never>(1u8), Ok(2)],
        ))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        assert_eq!(items, vec![1, 2]);
        let fetched: usize = w
            .ops()
            .iter()
            .map(|op| match op {
                Op::GetMany(keys) => keys.len(),
                _ => 0,
            })
            .sum();
        assert!(fetched <= 256, "{fetched} chunk keys fetched");
    }
}

pub async fn unknown_version_is_a_miss(b: SharedBackend) {
    let k = unique_key("version");
    let c = Counter::default();
    let o = opts();
    mz(&b, &k, &o, &c, 1u8).await;
    let stored = b.get(&k).await.unwrap().unwrap();
    let mut content = stored[..stored.len() - 8].to_vec();
    content[2] = cachelock::memoize::FORMAT_VERSION + 1;
    b.set(&k, &framed(&content), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(mz(&b, &k, &o, &c, 2u8).await, 2);
    assert_eq!(c.get(), 2);
    // An entry of the first format (before tombstones and stale marks) is
    // a clean miss too.
    let stored = b.get(&k).await.unwrap().unwrap();
    let mut content = stored[..stored.len() - 8].to_vec();
    content[2] = 1;
    b.set(&k, &framed(&content), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(mz(&b, &k, &o, &c, 3u8).await, 3);
    assert_eq!(c.get(), 3);
}

pub async fn wrong_type_is_a_miss(b: SharedBackend) {
    let k = unique_key("wrong-type");
    let c = Counter::default();
    let o = opts();
    mz(&b, &k, &o, &c, "a string".to_string()).await;
    assert_eq!(mz(&b, &k, &o, &c, 77u64).await, 77);
    assert_eq!(mz(&b, &k, &o, &c, 0u64).await, 77);
    assert_eq!(c.get(), 2);
}

/// A cold miss under the lock reads the value (and the failure record,
/// when failures are shared) with the lock's add, and not again after it:
/// before the compute, one plain read of the value, one `add_reading` of
/// the lock with the value's keys, and no other read of either.
pub async fn cold_miss_reads_with_the_lock(b: SharedBackend) {
    let w = Wrap::new(b);
    let b = w.shared();
    for share in [false, true] {
        let k = unique_key("miss-reads-with-lock");
        let mut o = opts().lock(lock_opts(Wait::Forever));
        if share {
            o = o.then(|b| b.share_failures(Duration::from_secs(5)));
        }
        let failure_key = format!("{k}:#f");
        w.clear();
        let before = Mutex::new(Vec::new());
        let v = memoize(&b, k.as_str(), &o, || async {
            *before.lock() = w.ops();
            Ok::<_, Never>(1u8)
        })
        .await
        .unwrap();
        assert_eq!(v, 1);
        let before = before.into_inner();
        let reads = |key: &str| {
            before
                .iter()
                .filter(|op| match op {
                    Op::Get(k) => k == key,
                    Op::GetMany(keys) => keys.iter().any(|k| k == key),
                    _ => false,
                })
                .count()
        };
        assert_eq!(reads(&k), 1, "share {share}: {before:?}");
        assert_eq!(reads(&failure_key), 0, "share {share}: {before:?}");
        let attempts: Vec<&Op> = before
            .iter()
            .filter(|op| matches!(op, Op::Add(_) | Op::AddReading(..)))
            .collect();
        match attempts[..] {
            [Op::AddReading(lock, keys)] => {
                assert_eq!(*lock, o.full_lock_key(&k.as_str().into()));
                assert_eq!(keys[0], k);
                assert_eq!(keys.contains(&failure_key), share, "{keys:?}");
            }
            ref other => panic!("share {share}: one add_reading, not {other:?}"),
        }
        // Stored and released as ever: the next call is a hit.
        assert_eq!(mz(&b, &k, &o, &Counter::default(), 2u8).await, 1);
    }
}
