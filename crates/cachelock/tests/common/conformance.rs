//! The backend conformance suite.
//!
//! Each case is a generic async function over `SharedBackend`. The
//! `conformance_tests!` macro expands every case into a `#[tokio::test]` for
//! one backend, so all backends run the very same cases.

use std::sync::Arc;
use std::time::Duration;

use cachelock::{
    BackendError, LockAdd, Queued, SharedBackend, TokenCheck, ValueFormat, fence_floor,
};

use super::unique_key;

const LONG: Duration = Duration::from_secs(60);

/// Expands every conformance case into a test for one backend.
///
/// `$make` is an expression (it may `.await`) producing the `SharedBackend`.
/// `$paused` says whether the tests run on paused tokio time (the in-memory
/// backend). Attributes after it go on every test: server backends pass
/// `#[ignore = "needs the test servers: scripts/test"]`.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr, paused = $paused:tt $(, #[$attr:meta])*) => {
        $crate::conformance_tests!(@cases $make, $paused, [$(#[$attr])*];
            get_set_roundtrip, missing_key_reads_none, binary_and_empty_values,
            get_many_with_holes, set_many_then_get_many, add_only_when_absent,
            add_race_has_one_winner, touch_missing_key, touch_extends, delete_reports_existence,
            ttl_expiry, add_after_expiry, incr_counts, incr_on_non_number_fails,
            delete_if_eq_cases, extend_if_eq_cases, token_ops_after_expiry, large_value,
            value_over_limit_is_typed, odd_keys, fenced_add_numbers_grants,
            fence_starts_at_the_clock_floor, version_ops_cases, list_under_a_prefix,
            add_reading_reads_after_the_add, set_if_compares, set_if_race_has_one_winner);
    };
    (@cases $make:expr, $paused:tt, $attrs:tt; $($case:ident),*) => {
        $(
            $crate::conformance_tests!(@attrs $attrs
            #[tokio::test(flavor = "current_thread", start_paused = $paused)]
            async fn $case() {
                let backend: cachelock::SharedBackend = $make;
                common::conformance::$case(backend).await;
            });
        )*
    };
    (@attrs [$(#[$attr:meta])*] $($item:tt)*) => {
        $(#[$attr])* $($item)*
    };
}

pub async fn get_set_roundtrip(b: SharedBackend) {
    let k = unique_key("roundtrip");
    b.set(&k, b"hello", LONG).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"hello"[..]));
    b.set(&k, b"again", LONG).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"again"[..]));
}

pub async fn missing_key_reads_none(b: SharedBackend) {
    let k = unique_key("missing");
    assert_eq!(b.get(&k).await.unwrap(), None);
    assert!(!b.delete(&k).await.unwrap());
}

pub async fn binary_and_empty_values(b: SharedBackend) {
    let k = unique_key("binary");
    let all: Vec<u8> = (0..=255u8).chain([b'\r', b'\n', 0, b' ']).collect();
    b.set(&k, &all, LONG).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&all[..]));
    let e = unique_key("empty");
    b.set(&e, b"", LONG).await.unwrap();
    assert_eq!(b.get(&e).await.unwrap().as_deref(), Some(&b""[..]));
}

pub async fn get_many_with_holes(b: SharedBackend) {
    let k1 = unique_key("many1");
    let k2 = unique_key("many2");
    let k3 = unique_key("many3");
    b.set(&k1, b"one", LONG).await.unwrap();
    b.set(&k3, b"three", LONG).await.unwrap();
    let got = b.get_many(&[&k1, &k2, &k3]).await.unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].as_deref(), Some(&b"one"[..]));
    assert_eq!(got[1], None);
    assert_eq!(got[2].as_deref(), Some(&b"three"[..]));
    assert!(b.get_many(&[]).await.unwrap().is_empty());
}

pub async fn set_many_then_get_many(b: SharedBackend) {
    let keys: Vec<String> = (0..20)
        .map(|i| unique_key(&format!("setmany{i}")))
        .collect();
    let values: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8; i * 100]).collect();
    let items: Vec<(&str, &[u8])> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    b.set_many(&items, LONG).await.unwrap();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let got = b.get_many(&refs).await.unwrap();
    for (g, v) in got.iter().zip(&values) {
        assert_eq!(g.as_deref(), Some(v.as_slice()));
    }
    b.set_many(&[], LONG).await.unwrap();
}

pub async fn add_only_when_absent(b: SharedBackend) {
    let k = unique_key("add");
    assert!(b.add(&k, b"first", LONG).await.unwrap());
    assert!(!b.add(&k, b"second", LONG).await.unwrap());
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"first"[..]));
}

pub async fn add_race_has_one_winner(b: SharedBackend) {
    let k = Arc::new(unique_key("race"));
    let mut tasks = Vec::new();
    for i in 0..32u32 {
        let (b, k) = (b.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            b.add(&k, i.to_string().as_bytes(), LONG).await.unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        if t.await.unwrap() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1, "exactly one add must win");
}

pub async fn touch_missing_key(b: SharedBackend) {
    assert!(!b.touch(&unique_key("touch-missing"), LONG).await.unwrap());
}

pub async fn touch_extends(b: SharedBackend) {
    let k = unique_key("touch");
    b.set(&k, b"v", Duration::from_secs(1)).await.unwrap();
    assert!(b.touch(&k, LONG).await.unwrap());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"v"[..]));
}

pub async fn delete_reports_existence(b: SharedBackend) {
    let k = unique_key("delete");
    b.set(&k, b"v", LONG).await.unwrap();
    assert!(b.delete(&k).await.unwrap());
    assert!(!b.delete(&k).await.unwrap());
    assert_eq!(b.get(&k).await.unwrap(), None);
}

pub async fn ttl_expiry(b: SharedBackend) {
    let k = unique_key("ttl");
    b.set(&k, b"v", Duration::from_secs(1)).await.unwrap();
    assert!(b.get(&k).await.unwrap().is_some());
    // Memcached counts whole seconds, so allow for its rounding.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(b.get(&k).await.unwrap(), None);
    let ttl = b.ttl(&k).await.unwrap();
    assert_eq!(ttl, None);
}

pub async fn add_after_expiry(b: SharedBackend) {
    let k = unique_key("add-expiry");
    assert!(b.add(&k, b"a", Duration::from_millis(500)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(
        b.add(&k, b"b", LONG).await.unwrap(),
        "an expired key can be added again"
    );
    if let Some(left) = b.ttl(&k).await.unwrap() {
        assert!(left <= LONG && left > Duration::from_secs(50), "{left:?}");
    }
}

pub async fn incr_counts(b: SharedBackend) {
    let k = unique_key("incr");
    assert_eq!(b.incr(&k, 5).await.unwrap(), 5);
    assert_eq!(b.incr(&k, 1).await.unwrap(), 6);
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"6"[..]));
    b.delete(&k).await.unwrap();
}

pub async fn incr_on_non_number_fails(b: SharedBackend) {
    let k = unique_key("incr-bad");
    b.set(&k, b"not a number", LONG).await.unwrap();
    let err = b.incr(&k, 1).await.unwrap_err();
    assert!(matches!(err, BackendError::Protocol { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&k),
        "the error names the key: {err}"
    );
}

pub async fn delete_if_eq_cases(b: SharedBackend) {
    let k = unique_key("delifeq");
    assert_eq!(
        b.delete_if_eq(&k, b"tok", LONG).await.unwrap(),
        TokenCheck::Missing
    );
    b.set(&k, b"other", LONG).await.unwrap();
    assert_eq!(
        b.delete_if_eq(&k, b"tok", LONG).await.unwrap(),
        TokenCheck::Mismatch
    );
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"other"[..]));
    b.set(&k, b"tok", LONG).await.unwrap();
    assert_eq!(
        b.delete_if_eq(&k, b"tok", LONG).await.unwrap(),
        TokenCheck::Matched
    );
    assert_eq!(b.get(&k).await.unwrap(), None);
}

pub async fn extend_if_eq_cases(b: SharedBackend) {
    let k = unique_key("extifeq");
    assert_eq!(
        b.extend_if_eq(&k, b"tok", LONG).await.unwrap(),
        TokenCheck::Missing
    );
    b.set(&k, b"other", Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        b.extend_if_eq(&k, b"tok", LONG).await.unwrap(),
        TokenCheck::Mismatch
    );
    b.set(&k, b"tok", Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        b.extend_if_eq(&k, b"tok", LONG).await.unwrap(),
        TokenCheck::Matched
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        b.get(&k).await.unwrap().as_deref(),
        Some(&b"tok"[..]),
        "extended past its first TTL"
    );
}

pub async fn token_ops_after_expiry(b: SharedBackend) {
    let k = unique_key("tok-expiry");
    assert!(b.add(&k, b"tok", Duration::from_secs(1)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        b.extend_if_eq(&k, b"tok", LONG).await.unwrap(),
        TokenCheck::Missing
    );
    assert_eq!(
        b.delete_if_eq(&k, b"tok", LONG).await.unwrap(),
        TokenCheck::Missing
    );
    assert!(b.add(&k, b"new", LONG).await.unwrap());
    assert_eq!(
        b.delete_if_eq(&k, b"tok", LONG).await.unwrap(),
        TokenCheck::Mismatch
    );
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"new"[..]));
}

pub async fn large_value(b: SharedBackend) {
    let k = unique_key("large");
    let size = b.max_value_size().min(1_000_000);
    let v: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    b.set(&k, &v, LONG).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&v[..]));
    b.delete(&k).await.unwrap();
}

pub async fn value_over_limit_is_typed(b: SharedBackend) {
    let limit = b.max_value_size();
    if limit > 64 * 1024 * 1024 {
        return; // Redis takes 512 MB values; not worth sending in a test.
    }
    let k = unique_key("too-large");
    let v = vec![7u8; limit + 1];
    let err = b.set(&k, &v, LONG).await.unwrap_err();
    assert!(matches!(err, BackendError::ValueTooLarge { .. }), "{err:?}");
    assert_eq!(b.get(&k).await.unwrap(), None);
}

pub async fn odd_keys(b: SharedBackend) {
    let base = unique_key("odd");
    let keys = [
        format!("{base} with spaces"),
        format!("{base}\nnewline\r"),
        format!("{base}-ünïcødé-🥳"),
        format!("{base}-{}", "x".repeat(400)),
    ];
    for (i, k) in keys.iter().enumerate() {
        let v = format!("value {i}");
        b.set(k, v.as_bytes(), LONG).await.unwrap();
    }
    for (i, k) in keys.iter().enumerate() {
        let v = format!("value {i}");
        assert_eq!(
            b.get(k).await.unwrap().as_deref(),
            Some(v.as_bytes()),
            "key {k:?}"
        );
    }
    // Distinct odd keys stay distinct.
    let a = format!("{base} a");
    let b2 = format!("{base}\ta");
    b.set(&a, b"1", LONG).await.unwrap();
    b.set(&b2, b"2", LONG).await.unwrap();
    assert_eq!(b.get(&a).await.unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(b.get(&b2).await.unwrap().as_deref(), Some(&b"2"[..]));
}

/// `add_fenced` is an add that numbers each grant: held means `None` (and
/// the key is untouched), and every grant's fence is above the last.
pub async fn fenced_add_numbers_grants(b: SharedBackend) {
    let k = unique_key("fenced");
    let mut last = 0;
    for round in 0..5 {
        let mine = format!("holder-{round}");
        let grant = b
            .add_fenced(&k, mine.as_bytes(), LONG, cachelock::ValueFormat::Raw)
            .await
            .unwrap()
            .expect("the key is free");
        assert!(
            grant.fence > last,
            "round {round}: {} after {last}",
            grant.fence
        );
        last = grant.fence;
        assert_eq!(b.fence(&k).await.unwrap(), Some(grant.fence));
        assert_eq!(
            b.add_fenced(&k, b"other", LONG, cachelock::ValueFormat::Raw)
                .await
                .unwrap(),
            None
        );
        assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(mine.as_bytes()));
        assert_eq!(
            b.delete_if_version(&k, mine.as_bytes(), grant.version, LONG)
                .await
                .unwrap(),
            TokenCheck::Matched
        );
    }
}

/// A counter that does not exist (never granted, or lost) starts at the
/// wall-clock floor, so it cannot start below numbers handed out before.
pub async fn fence_starts_at_the_clock_floor(b: SharedBackend) {
    let k = unique_key("fence-floor");
    assert_eq!(b.fence(&k).await.unwrap(), None);
    let before = fence_floor(std::time::SystemTime::now() - Duration::from_secs(60));
    let grant = b
        .add_fenced(&k, b"v", LONG, cachelock::ValueFormat::Raw)
        .await
        .unwrap()
        .unwrap();
    let after = fence_floor(std::time::SystemTime::now() + Duration::from_secs(60));
    assert!(
        (before..after).contains(&grant.fence),
        "{before} <= {} < {after}",
        grant.fence
    );
}

/// The owner-checked operations given the grant's version: they still tell
/// matched, another value and missing apart, also with an out-of-date
/// version, and extend hands back a version that works next time.
pub async fn version_ops_cases(b: SharedBackend) {
    let k = unique_key("version");
    let grant = b
        .add_fenced(&k, b"mine", LONG, cachelock::ValueFormat::Raw)
        .await
        .unwrap()
        .unwrap();
    let (check, v2) = b
        .extend_if_version(&k, b"mine", grant.version, LONG)
        .await
        .unwrap();
    assert_eq!(check, TokenCheck::Matched);
    let (check, v3) = b.extend_if_version(&k, b"mine", v2, LONG).await.unwrap();
    assert_eq!(check, TokenCheck::Matched);
    // An out-of-date version: still ours, so still matched.
    let (check, _) = b
        .extend_if_version(&k, b"mine", grant.version, LONG)
        .await
        .unwrap();
    assert_eq!(check, TokenCheck::Matched);
    assert_eq!(
        b.delete_if_version(&k, b"mine", v3, LONG).await.unwrap(),
        TokenCheck::Matched
    );
    assert_eq!(b.get(&k).await.unwrap(), None);

    // Someone else's value under the key: nothing is changed.
    let grant = b
        .add_fenced(&k, b"mine", LONG, cachelock::ValueFormat::Raw)
        .await
        .unwrap()
        .unwrap();
    b.set(&k, b"theirs", LONG).await.unwrap();
    assert_eq!(
        b.extend_if_version(&k, b"mine", grant.version, LONG)
            .await
            .unwrap()
            .0,
        TokenCheck::Mismatch
    );
    assert_eq!(
        b.delete_if_version(&k, b"mine", grant.version, LONG)
            .await
            .unwrap(),
        TokenCheck::Mismatch
    );
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"theirs"[..]));

    // Gone: missing.
    assert!(b.delete(&k).await.unwrap());
    assert_eq!(
        b.extend_if_version(&k, b"mine", grant.version, LONG)
            .await
            .unwrap()
            .0,
        TokenCheck::Missing
    );
    assert_eq!(
        b.delete_if_version(&k, b"mine", grant.version, LONG)
            .await
            .unwrap(),
        TokenCheck::Missing
    );
}

/// `list` (for `cachelock list`): exactly the live keys under the prefix,
/// with values and TTLs, capped by the limit; Memcached says it cannot.
pub async fn list_under_a_prefix(b: SharedBackend) {
    let p = unique_key("list");
    let (a, c) = (format!("{p}:a"), format!("{p}:c"));
    let outside = format!("{p}x:b");
    b.set(&a, b"1", LONG).await.unwrap();
    b.set(&c, b"2", LONG).await.unwrap();
    b.set(&outside, b"3", LONG).await.unwrap();
    let listed = match b.list(&format!("{p}:"), 10).await {
        Err(BackendError::Unsupported { backend, .. }) => {
            assert_eq!(backend, "memcached", "only Memcached cannot list");
            return;
        }
        other => other.unwrap(),
    };
    let mut found: Vec<(String, Vec<u8>)> = listed
        .iter()
        .map(|l| (l.key.clone(), l.value.to_vec()))
        .collect();
    found.sort();
    assert_eq!(found, [(a, b"1".to_vec()), (c, b"2".to_vec())]);
    for l in &listed {
        assert!(
            l.ttl
                .is_some_and(|t| t <= LONG && t > Duration::from_secs(50)),
            "{l:?}"
        );
    }
    assert_eq!(b.list(&format!("{p}:"), 1).await.unwrap().len(), 1);
    // Glob characters in the prefix are literal.
    assert!(b.list(&format!("{p}*"), 10).await.unwrap().is_empty());
}

/// `add_reading` is the lock's add (fenced or queued) followed by a read:
/// the values come back in order with holes, the lock key itself reads as
/// the add left it (the read comes after the add), a held key is left
/// alone, and the grant is one the owner-checked operations accept. Keys
/// with one hash tag (one script on a Cluster) and without (spread over
/// slots or servers) alike.
pub async fn add_reading_reads_after_the_add(b: SharedBackend) {
    let tag = unique_key("add-reading");
    for prefix in [format!("{{{tag}}}"), tag.clone()] {
        let lock = format!("{prefix}:lock");
        let keys: Vec<String> = (0..6).map(|i| format!("{prefix}:{i}")).collect();
        for (i, k) in keys.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
            b.set(k, format!("value {i}").as_bytes(), LONG)
                .await
                .unwrap();
        }
        let mut read: Vec<&str> = keys.iter().map(String::as_str).collect();
        read.push(&lock);
        let expected = |lock_value: &[u8]| -> Vec<Option<Vec<u8>>> {
            (0..6)
                .map(|i| (i % 2 == 0).then(|| format!("value {i}").into_bytes()))
                .chain([Some(lock_value.to_vec())])
                .collect()
        };
        let got = |values: Vec<Option<bytes::Bytes>>| -> Vec<Option<Vec<u8>>> {
            values.into_iter().map(|v| v.map(|v| v.to_vec())).collect()
        };
        let mut last = 0;
        for add in [LockAdd::Fenced(ValueFormat::Raw), LockAdd::Queued] {
            let mine = format!("mine {add:?}");
            let r = b
                .add_reading(&lock, mine.as_bytes(), LONG, add, &read)
                .await
                .unwrap();
            let Queued::Granted(grant) = r.outcome else {
                panic!("{add:?}: the lock key is free, yet {:?}", r.outcome);
            };
            assert!(grant.fence > last, "{add:?}: {} after {last}", grant.fence);
            last = grant.fence;
            assert_eq!(got(r.values.unwrap()), expected(mine.as_bytes()), "{add:?}");
            assert_eq!(b.fence(&lock).await.unwrap(), Some(grant.fence));

            // Held: no grant, nothing changed, and still read.
            let r = b
                .add_reading(&lock, b"other", LONG, add, &read)
                .await
                .unwrap();
            assert!(matches!(r.outcome, Queued::Held { .. }), "{add:?}");
            assert_eq!(got(r.values.unwrap()), expected(mine.as_bytes()), "{add:?}");
            if add == LockAdd::Queued {
                b.leave_queue(&lock, b"other", LONG).await.unwrap();
            }
            assert_eq!(
                b.delete_if_version(&lock, mine.as_bytes(), grant.version, LONG)
                    .await
                    .unwrap(),
                TokenCheck::Matched,
                "{add:?}"
            );
        }
        // No keys: the add alone.
        let r = b
            .add_reading(
                &lock,
                b"alone",
                LONG,
                LockAdd::Fenced(ValueFormat::Raw),
                &[],
            )
            .await
            .unwrap();
        assert!(matches!(r.outcome, Queued::Granted(_)));
        assert_eq!(r.values.unwrap(), Vec::<Option<bytes::Bytes>>::new());
        assert!(b.delete(&lock).await.unwrap());
    }
}

/// `set_if` stores only over exactly the expected value (or absence).
pub async fn set_if_compares(b: SharedBackend) {
    let k = unique_key("setif");
    assert!(
        !b.set_if(&k, Some(b"x"), b"v1", LONG).await.unwrap(),
        "absent is not x"
    );
    assert_eq!(b.get(&k).await.unwrap(), None);
    assert!(
        b.set_if(&k, None, b"v1", LONG).await.unwrap(),
        "absent as expected"
    );
    assert!(
        !b.set_if(&k, None, b"v2", LONG).await.unwrap(),
        "present, not absent"
    );
    assert!(
        !b.set_if(&k, Some(b"v"), b"v2", LONG).await.unwrap(),
        "a prefix is not equal"
    );
    assert!(!b.set_if(&k, Some(b"v1 "), b"v2", LONG).await.unwrap());
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"v1"[..]));
    assert!(b.set_if(&k, Some(b"v1"), b"v2", LONG).await.unwrap());
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"v2"[..]));
    // Binary values, and the TTL is set by the write.
    let bin: Vec<u8> = (0..=255u8).chain([b'\r', b'\n', 0]).collect();
    assert!(b.set_if(&k, Some(b"v2"), &bin, LONG).await.unwrap());
    assert!(b.set_if(&k, Some(&bin), b"", LONG).await.unwrap());
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b""[..]));
    if let Some(ttl) = b.ttl(&k).await.unwrap() {
        assert!(ttl <= LONG && ttl > LONG / 2, "ttl {ttl:?}");
    }
    b.delete(&k).await.unwrap();
    assert!(
        !b.set_if(&k, Some(b""), b"v3", LONG).await.unwrap(),
        "deleted is absent"
    );
}

/// Of concurrent `set_if`s over the same expected value, one stores.
pub async fn set_if_race_has_one_winner(b: SharedBackend) {
    let k = Arc::new(unique_key("setif-race"));
    b.set(&k, b"start", LONG).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let (b, k) = (b.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let mine = format!("w{i}");
            let won = b
                .set_if(&k, Some(b"start"), mine.as_bytes(), LONG)
                .await
                .unwrap();
            (won, mine)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (won, mine) = t.await.unwrap();
        if won {
            winners.push(mine);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(
        b.get(&k).await.unwrap().as_deref(),
        Some(winners[0].as_bytes())
    );
}
