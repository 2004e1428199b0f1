//! memoize_stream on the embedded backend (paused time).
mod common;

use std::sync::Arc;

use cachelock::{MemoryBackend, SharedBackend};

memoize_stream_tests!(
    Arc::new(MemoryBackend::new()) as SharedBackend,
    paused = true
);

mod props {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;
    use std::time::Duration;

    use crate::common::opts::{Opts, memoize_iter};
    use cachelock::{MemoizeError, MemoryBackend, SharedBackend};
    use futures_util::StreamExt;
    use proptest::prelude::*;

    use super::common;
    use super::common::memoize_cases::{Never, Wrap};

    fn items(tag: &str) -> Vec<String> {
        (0..60).map(|i| format!("{tag}{i:0>1000}")).collect()
    }

    async fn read(
        b: &SharedBackend,
        k: &str,
        o: &Opts,
    ) -> Vec<Result<String, MemoizeError<Never>>> {
        memoize_iter(b, k, o, items("fresh").into_iter().map(Ok::<_, Never>))
            .collect()
            .await
    }

    /// A chunk of the second batch lost after the first items were handed
    /// out: the stream ends with `Corrupt`, after correct items only.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn chunk_lost_mid_stream_ends_with_an_error() {
        let w = Wrap::new(Arc::new(MemoryBackend::new()));
        let b = w.shared();
        let k = common::unique_key("mid-stream");
        let o = Opts::new().chunk_size(256).compression(false);
        let stored = items("stored");
        let _: Vec<_> = memoize_iter(
            &b,
            k.as_str(),
            &o,
            stored.clone().into_iter().map(Ok::<_, Never>),
        )
        .collect()
        .await;
        let chunks = w.chunk_keys();
        assert!(chunks.len() > 300, "{}", chunks.len());
        assert!(w.inner.delete(chunks.last().unwrap()).await.unwrap());
        let got = read(&b, &k, &o).await;
        let (last, ok) = got.split_last().unwrap();
        assert!(
            matches!(last, Err(MemoizeError::Corrupt { .. })),
            "{last:?}"
        );
        let ok: Vec<String> = ok.iter().map(|r| r.as_ref().unwrap().clone()).collect();
        assert!(
            !ok.is_empty() && stored.starts_with(&ok),
            "{} items",
            ok.len()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever is done to a stored stream's items in the cache, a
        /// reader gets the stored items, or the freshly produced ones, or
        /// a prefix of the stored ones followed by an error: never a wrong
        /// or made-up item, never a panic.
        #[test]
        fn corrupted_streams_never_yield_wrong_items(
            target in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
            truncate in any::<bool>(),
            compressed in any::<bool>(),
            encrypted in any::<bool>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
            rt.block_on(async {
                let w = Wrap::new(Arc::new(MemoryBackend::new()));
                let b = w.shared();
                let k = common::unique_key("prop-stream");
                let mut o = Opts::new().chunk_size(256).compression(compressed);
                if encrypted {
                    o = o.encryption_key(b"0123456789abcdef");
                }
                let stored = items("stored");
                let first: Vec<String> = memoize_iter(&b, k.as_str(), &o, stored.clone().into_iter().map(Ok::<_, Never>))
                    .map(Result::unwrap)
                    .collect()
                    .await;
                prop_assert_eq!(&first, &stored);
                let mut keys = w.chunk_keys();
                keys.push(o.full_key(&k.as_str().into()));
                let victim = target.get(&keys).clone();
                let mut bytes = w.inner.get(&victim).await.unwrap().unwrap().to_vec();
                for (at, x) in &flips {
                    let i = at.index(bytes.len());
                    bytes[i] ^= x;
                }
                if truncate {
                    bytes.truncate(bytes.len() / 2);
                }
                w.inner.set(&victim, &bytes, Duration::from_secs(60)).await.unwrap();
                let got = read(&b, &k, &o).await;
                let ok: Vec<String> = got.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
                let errors = got.iter().filter(|r| r.is_err()).count();
                if errors == 0 {
                    prop_assert!(ok == stored || ok == items("fresh"), "{} items", ok.len());
                } else {
                    prop_assert_eq!(errors, 1);
                    prop_assert!(got.last().unwrap().is_err());
                    prop_assert!(stored.starts_with(&ok), "{} items", ok.len());
                }
                Ok(())
            })?;
        }
    }
}
