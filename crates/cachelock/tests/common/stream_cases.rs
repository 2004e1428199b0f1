//! memoize_stream cases written once over `SharedBackend`, fanned out over
//! backends by [`memoize_stream_tests!`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use cachelock::{CacheLock, LockOptions, MemoizeError, SharedBackend};
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;

use super::memoize_cases::{Counter, Logs, Never, Op, Wait, Wrap, opts, rich};
use super::opts::{Opts, memoize, memoize_iter, memoize_stream};
use super::unique_key;

/// Expands every stream case into a test for one backend, as
/// [`conformance_tests!`](crate::conformance_tests) does (the same arguments).
#[macro_export]
macro_rules! memoize_stream_tests {
    ($make:expr, paused = $paused:tt $(, #[$attr:meta])*) => {
        $crate::memoize_stream_tests!(@cases $make, $paused, [$(#[$attr])*];
            stream_round_trip_then_hit, items_handed_out_as_produced,
            full_chunks_written_as_they_fill, hit_streams_chunk_by_chunk,
            early_drop_releases_lock_and_writes_no_manifest, producer_error_is_passed_on,
            empty_and_unicode_streams, compressed_and_encrypted_streams,
            corrupt_stream_rebuilt_under_lock, store_error_still_yields_items,
            stream_value_appearing_while_waiting, values_and_streams_do_not_mix);
    };
    (@cases $make:expr, $paused:tt, $attrs:tt; $($case:ident),*) => {
        $(
            $crate::memoize_stream_tests!(@attrs $attrs
            #[tokio::test(flavor = "current_thread", start_paused = $paused)]
            async fn $case() {
                common::logs::init();
                let backend: cachelock::SharedBackend = $make;
                common::stream_cases::$case(backend).await;
            });
        )*
    };
    (@attrs [$(#[$attr:meta])*] $($item:tt)*) => {
        $(#[$attr])* $($item)*
    };
}

/// A producer fed by a channel, so a test decides when each item comes.
fn channel_producer<T: Send + 'static>() -> (
    mpsc::UnboundedSender<Result<T, Never>>,
    impl Stream<Item = Result<T, Never>> + Send + 'static,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let s =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) });
    (tx, s)
}

/// A producer that counts how often it is polled for an item.
fn counted<T: Clone + Send + 'static>(
    items: Vec<T>,
    c: &Counter,
) -> impl Stream<Item = Result<T, Never>> + Send + 'static {
    let c = c.clone();
    futures_util::stream::iter(items).map(move |v| {
        c.hit();
        Ok(v)
    })
}

async fn collect<T, E: std::fmt::Debug>(
    s: impl Stream<Item = Result<T, MemoizeError<E>>>,
) -> Vec<T> {
    s.map(|r| r.unwrap()).collect().await
}

fn small() -> Opts {
    opts().chunk_size(256).compression(false)
}

fn lock_opts(wait: Wait) -> LockOptions {
    let o = LockOptions::new().lease(Duration::from_secs(10));
    match wait {
        Wait::Once => o.max_wait(Duration::ZERO),
        Wait::Forever => o,
        Wait::Timeout(d) => o.max_wait(d),
    }
}

pub async fn stream_round_trip_then_hit(b: SharedBackend) {
    for o in [opts(), small()] {
        let k = unique_key("stream");
        let items: Vec<(u32, String)> = (0..100).map(|i| (i, format!("item {i} ✓"))).collect();
        let c = Counter::default();
        assert_eq!(
            collect(memoize_stream(
                &b,
                k.as_str(),
                &o,
                counted(items.clone(), &c)
            ))
            .await,
            items
        );
        assert_eq!(c.get(), 100);
        assert_eq!(
            collect(memoize_stream(
                &b,
                k.as_str(),
                &o,
                counted(vec![(0, String::new())], &c)
            ))
            .await,
            items
        );
        assert_eq!(c.get(), 100, "the producer is not polled on a hit");
    }
}

pub async fn items_handed_out_as_produced(b: SharedBackend) {
    let k = unique_key("as-produced");
    let (tx, producer) = channel_producer::<u64>();
    let mut s = memoize_stream(&b, k.as_str(), &small(), producer);
    for i in 0..50u64 {
        tx.send(Ok(i)).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("the item came before the next one was produced");
        assert_eq!(got.unwrap().unwrap(), i);
    }
    drop(tx);
    assert!(s.next().await.is_none());
    let c = Counter::default();
    assert_eq!(
        collect(memoize_stream(
            &b,
            k.as_str(),
            &small(),
            counted(vec![9u64], &c)
        ))
        .await,
        (0..50).collect::<Vec<_>>()
    );
    assert_eq!(c.get(), 0);
}

pub async fn full_chunks_written_as_they_fill(b: SharedBackend) {
    let w = Wrap::new(b);
    let b = w.shared();
    let k = unique_key("as-they-fill");
    let (tx, producer) = channel_producer::<String>();
    let mut s = memoize_stream(&b, k.as_str(), &small(), producer);
    for i in 0..20 {
        tx.send(Ok(format!("{i:->60}"))).unwrap();
        s.next().await.unwrap().unwrap();
    }
    // ~1,240 bytes so far: several chunks written, no manifest yet.
    let written = w.chunk_keys().len();
    assert!(written >= 4, "{written} chunks written while producing");
    assert!(
        !w.ops()
            .iter()
            .any(|op| matches!(op, Op::Set(key, _) if *key == k))
    );
    drop(tx);
    assert!(s.next().await.is_none());
    let last = w.ops().into_iter().last().unwrap();
    assert!(
        matches!(last, Op::Set(ref key, _) if *key == k),
        "manifest last: {last:?}"
    );
}

pub async fn hit_streams_chunk_by_chunk(b: SharedBackend) {
    let w = Wrap::new(b);
    let b = w.shared();
    let k = unique_key("chunk-by-chunk");
    let items: Vec<String> = (0..1_200).map(|i| format!("{i:0>98}")).collect();
    let c = Counter::default();
    collect(memoize_stream(
        &b,
        k.as_str(),
        &small(),
        counted(items.clone(), &c),
    ))
    .await;
    let chunks = w.chunk_keys().len();
    assert!(chunks > 512, "{chunks}");
    w.clear();
    let mut s = memoize_stream(&b, k.as_str(), &small(), counted(vec![String::new()], &c));
    assert_eq!(s.next().await.unwrap().unwrap(), items[0]);
    let fetched: Vec<usize> = w
        .ops()
        .iter()
        .filter_map(|op| match op {
            Op::GetMany(keys) => Some(keys.len()),
            _ => None,
        })
        .collect();
    assert_eq!(fetched.len(), 1, "one batch fetched before the first item");
    assert!(fetched[0] < chunks);
    let mut rest = vec![items[0].clone()];
    while let Some(item) = s.next().await {
        rest.push(item.unwrap());
    }
    assert_eq!(rest, items);
    let batches = w.count(|op| matches!(op, Op::GetMany(_)));
    assert!(batches >= 3, "{batches}");
    assert_eq!(c.get(), 1_200);
}

pub async fn early_drop_releases_lock_and_writes_no_manifest(b: SharedBackend) {
    let k = unique_key("early-drop");
    let o = small().lock(lock_opts(Wait::Forever));
    let lock_key = o.full_lock_key(&k.as_str().into());
    let c = Counter::default();
    let items: Vec<String> = (0..100).map(|i| format!("{i:0>50}")).collect();
    let mut s = memoize_stream(&b, k.as_str(), &o, counted(items.clone(), &c));
    for item in items.iter().take(10) {
        assert_eq!(&s.next().await.unwrap().unwrap(), item);
    }
    assert!(
        b.get(&lock_key).await.unwrap().is_some(),
        "held while producing"
    );
    drop(s);
    // The release runs in the background.
    for _ in 0..100 {
        if b.get(&lock_key).await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(b.get(&lock_key).await.unwrap().is_none(), "lock released");
    assert!(b.get(&k).await.unwrap().is_none(), "no manifest");
    let c2 = Counter::default();
    assert_eq!(
        collect(memoize_stream(
            &b,
            k.as_str(),
            &o,
            counted(items.clone(), &c2)
        ))
        .await,
        items
    );
    assert_eq!(c2.get(), 100);
}

pub async fn producer_error_is_passed_on(b: SharedBackend) {
    let k = unique_key("producer-error");
    let o = opts().lock(lock_opts(Wait::Forever));
    let lock_key = o.full_lock_key(&k.as_str().into());
    let items = vec![Ok(1u8), Ok(2), Err(std::io::Error::other("boom")), Ok(4)];
    let got: Vec<_> = memoize_iter(&b, k.as_str(), &o, items).collect().await;
    assert_eq!(got.len(), 3);
    assert_eq!(*got[0].as_ref().unwrap(), 1);
    assert_eq!(*got[1].as_ref().unwrap(), 2);
    match &got[2] {
        Err(MemoizeError::Compute(e)) => assert_eq!(e.to_string(), "boom"),
        other => panic!("{other:?}"),
    }
    assert!(b.get(&k).await.unwrap().is_none(), "nothing cached");
    assert!(b.get(&lock_key).await.unwrap().is_none(), "lock released");
}

pub async fn empty_and_unicode_streams(b: SharedBackend) {
    let c = Counter::default();
    let k = unique_key("empty");
    assert!(
        collect(memoize_stream(
            &b,
            k.as_str(),
            &small(),
            counted(Vec::<u8>::new(), &c)
        ))
        .await
        .is_empty()
    );
    assert!(
        collect(memoize_stream(
            &b,
            k.as_str(),
            &small(),
            counted(vec![1u8], &c)
        ))
        .await
        .is_empty()
    );
    assert_eq!(c.get(), 0);
    let k = unique_key("unicode-stream");
    let items = vec![
        "🥳".repeat(100),
        "ℝ".into(),
        String::new(),
        "é".repeat(1000),
    ];
    assert_eq!(
        collect(memoize_stream(
            &b,
            k.as_str(),
            &small(),
            counted(items.clone(), &c)
        ))
        .await,
        items
    );
    assert_eq!(
        collect(memoize_stream(
            &b,
            k.as_str(),
            &small(),
            counted(Vec::<String>::new(), &c)
        ))
        .await,
        items
    );
}

pub async fn compressed_and_encrypted_streams(b: SharedBackend) {
    for (comp, enc) in [(true, false), (false, true), (true, true)] {
        let k = unique_key("codec-stream");
        let mut o = opts().chunk_size(1024).compression(comp);
        if enc {
            o = o.encryption_key(b"0123456789abcdef");
        }
        let items: Vec<_> = (0..200)
            .map(|i| super::memoize_cases::Rich { id: i, ..rich() })
            .collect();
        let c = Counter::default();
        assert_eq!(
            collect(memoize_stream(
                &b,
                k.as_str(),
                &o,
                counted(items.clone(), &c)
            ))
            .await,
            items
        );
        assert_eq!(
            collect(memoize_stream(
                &b,
                k.as_str(),
                &o,
                counted(Vec::<super::memoize_cases::Rich>::new(), &c)
            ))
            .await,
            items
        );
        assert_eq!(c.get(), 200);
        if enc {
            // Another key: a miss.
            let o2 = o.clone().encryption_key(b"another key");
            assert_eq!(
                collect(memoize_stream(
                    &b,
                    k.as_str(),
                    &o2,
                    counted(vec![rich()], &c)
                ))
                .await,
                vec![rich()]
            );
        }
    }
}

pub async fn corrupt_stream_rebuilt_under_lock(b: SharedBackend) {
    let w = Wrap::new(b);
    let b = w.shared();
    let o = small().lock(lock_opts(Wait::Forever));
    let items: Vec<String> = (0..40).map(|i| format!("{i:0>40}")).collect();
    // A missing chunk, found before any item is handed out.
    let k = unique_key("corrupt-stream");
    let c = Counter::default();
    collect(memoize_stream(
        &b,
        k.as_str(),
        &o,
        counted(items.clone(), &c),
    ))
    .await;
    let chunks = w.chunk_keys();
    assert!(w.inner.delete(&chunks[0]).await.unwrap());
    let logs = Logs::capture();
    w.clear();
    assert_eq!(
        collect(memoize_stream(
            &b,
            k.as_str(),
            &o,
            counted(items.clone(), &c)
        ))
        .await,
        items
    );
    assert_eq!(c.get(), 80);
    assert!(logs.text().contains("missing chunk"), "{}", logs.text());
    // Rebuilt under the lock.
    let lock_key = o.full_lock_key(&k.as_str().into());
    assert!(w.ops().contains(&Op::Add(lock_key)));
    // Garbage under the key.
    let k = unique_key("garbage-stream");
    b.set(&k, b"garbage", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        collect(memoize_stream(
            &b,
            k.as_str(),
            &o,
            counted(items.clone(), &c)
        ))
        .await,
        items
    );
    assert_eq!(
        collect(memoize_stream(
            &b,
            k.as_str(),
            &o,
            counted(Vec::<String>::new(), &c)
        ))
        .await,
        items
    );
    assert_eq!(c.get(), 120);
}

pub async fn store_error_still_yields_items(b: SharedBackend) {
    let w = Wrap::new(b);
    let b = w.shared();
    let k = unique_key("stream-store-error");
    w.fail_set.store(true, Ordering::Relaxed);
    let logs = Logs::capture();
    let items: Vec<String> = (0..40).map(|i| format!("{i:0>40}")).collect();
    let c = Counter::default();
    assert_eq!(
        collect(memoize_stream(
            &b,
            k.as_str(),
            &small(),
            counted(items.clone(), &c)
        ))
        .await,
        items
    );
    assert!(
        logs.text().contains("Unable to store cached data"),
        "{}",
        logs.text()
    );
    assert!(logs.text().contains(&k));
    w.fail_set.store(false, Ordering::Relaxed);
    assert!(w.inner.get(&k).await.unwrap().is_none());
    assert_eq!(
        w.count(|op| matches!(op, Op::SetMany(_))),
        1,
        "no more writes after the failure"
    );
}

pub async fn stream_value_appearing_while_waiting(b: SharedBackend) {
    let k = unique_key("stream-appears");
    let o = small().lock(lock_opts(Wait::Timeout(Duration::from_secs(20))));
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
            collect(memoize_stream(&b, k.as_str(), &o, counted(vec![0u32], &c))).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let items: Vec<u32> = (1..500).collect();
    let c2 = Counter::default();
    collect(memoize_stream(
        &Wrap::new(b.clone()).shared(),
        k.as_str(),
        &small(),
        counted(items.clone(), &c2),
    ))
    .await;
    assert_eq!(waiter.await.unwrap(), items);
    assert_eq!(c.get(), 0);
    let _ = held.release().await.unwrap();
}

pub async fn values_and_streams_do_not_mix(b: SharedBackend) {
    let k = unique_key("mix");
    let c = Counter::default();
    let v: Vec<u32> = memoize(&b, k.as_str(), &opts(), || async {
        Ok::<_, Never>(vec![1, 2])
    })
    .await
    .unwrap();
    assert_eq!(v, vec![1, 2]);
    // Read as a stream: a miss, rebuilt.
    assert_eq!(
        collect(memoize_stream(
            &b,
            k.as_str(),
            &opts(),
            counted(vec![7u32], &c)
        ))
        .await,
        vec![7]
    );
    assert_eq!(c.get(), 1);
    // And back as a value: a miss.
    let v: Vec<u32> = memoize(&b, k.as_str(), &opts(), || async {
        Ok::<_, Never>(vec![3])
    })
    .await
    .unwrap();
    assert_eq!(v, vec![3]);
}
