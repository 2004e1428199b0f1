//! Building full cache keys.
//!
//! The rules are those of Djblets' `make_cache_key`, with a configurable
//! namespace in place of Django's site domain, and two fixes:
//!
//! * a key given as parts is always escaped, also when it has one part (the
//!   original left one-part keys unescaped, so `["a:b"]` and `["a", "b"]`
//!   collided);
//! * the length limit counts **bytes**, not characters, so non-ASCII keys
//!   stay within Memcached's 250-byte limit.
//!
//! ```
//! use cachelock::KeyBuilder;
//!
//! let keys = KeyBuilder::new("example.com");
//! assert_eq!(keys.build("test123"), "example.com:test123");
//! assert_eq!(keys.build(["test", ":123"]), "example.com:test:%3A123");
//! ```

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// The longest key built, in bytes. Memcached allows 250; ten are left for
/// suffixes.
pub const MAX_KEY_LEN: usize = 240;

/// Put between the kept prefix of an over-long key and its digest. No
/// escaped key contains it: [`escape_invalid`] turns every backslash into
/// `\x5c`, so in an escaped key a backslash is always followed by `x`.
const HASHED_KEY_MARKER: &str = "\\#";

/// How many bytes of an over-long key are kept before the marker and its
/// SHA-256 digest.
const KEPT_PREFIX_LEN: usize = MAX_KEY_LEN - HASHED_KEY_MARKER.len() - 64;

/// The marker placed before a value's key to form its default lock key.
pub const LOCK_KEY_MARKER: &str = "_lock_";

/// A cache key as the caller gives it: one string used as it is, or parts
/// that are escaped and joined with `:`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CacheKey {
    /// A string used as is (not escaped).
    Plain(String),
    /// Parts, each escaped (`%` becomes `%25`, then `:` becomes `%3A`).
    Parts(Vec<String>),
}

impl CacheKey {
    /// The key with `prefix` put in front of it as one more part. A plain
    /// key stays plain (`prefix:key`); parts get `prefix` as a first part.
    pub fn prefixed(&self, prefix: &str) -> CacheKey {
        match self {
            CacheKey::Plain(k) => CacheKey::Plain(format!("{prefix}:{k}")),
            CacheKey::Parts(parts) => CacheKey::Parts(
                std::iter::once(prefix.to_owned())
                    .chain(parts.iter().cloned())
                    .collect(),
            ),
        }
    }
}

impl From<&str> for CacheKey {
    fn from(s: &str) -> Self {
        CacheKey::Plain(s.to_owned())
    }
}

impl From<String> for CacheKey {
    fn from(s: String) -> Self {
        CacheKey::Plain(s)
    }
}

impl From<&String> for CacheKey {
    fn from(s: &String) -> Self {
        CacheKey::Plain(s.clone())
    }
}

impl From<Vec<String>> for CacheKey {
    fn from(parts: Vec<String>) -> Self {
        CacheKey::Parts(parts)
    }
}

impl From<&[&str]> for CacheKey {
    fn from(parts: &[&str]) -> Self {
        CacheKey::Parts(parts.iter().map(|p| (*p).to_owned()).collect())
    }
}

impl<const N: usize> From<[&str; N]> for CacheKey {
    fn from(parts: [&str; N]) -> Self {
        CacheKey::Parts(parts.iter().map(|p| (*p).to_owned()).collect())
    }
}

/// Tuples of 1 to 8 parts, each anything [`Display`](std::fmt::Display)
/// (`&str`, `String`, integers, ...), are [`CacheKey::Parts`]: every part
/// is escaped, so `("user", 42)` and `("user:42",)` are different keys.
///
/// ```
/// use cachelock::{CacheKey, KeyBuilder};
///
/// let keys = KeyBuilder::new("app");
/// let name = String::from("ann");
/// assert_eq!(keys.build(("user", 42u64)), "app:user:42");
/// assert_eq!(keys.build(("user", &name, "a:b")), "app:user:ann:a%3Ab");
/// assert_eq!(CacheKey::from(("a", "b")), CacheKey::Parts(vec!["a".into(), "b".into()]));
/// ```
macro_rules! tuple_keys {
    ($($name:ident),+) => {
        impl<$($name: std::fmt::Display),+> From<($($name,)+)> for CacheKey {
            #[allow(non_snake_case)]
            fn from(($($name,)+): ($($name,)+)) -> Self {
                CacheKey::Parts(vec![$($name.to_string()),+])
            }
        }
    };
}

tuple_keys!(A);
tuple_keys!(A, B);
tuple_keys!(A, B, C);
tuple_keys!(A, B, C, D);
tuple_keys!(A, B, C, D, E);
tuple_keys!(A, B, C, D, E, F);
tuple_keys!(A, B, C, D, E, F, G);
tuple_keys!(A, B, C, D, E, F, G, H);

/// Builds full cache keys: namespace, escaping, length limit and optional
/// HMAC.
///
/// Every key it builds is valid for Memcached: at most [`MAX_KEY_LEN`] bytes
/// (plus Django's prefix with [`KeyBuilder::django`]), no byte at or below
/// `0x20`, and no `0x7f`.
#[derive(Clone, Default)]
pub struct KeyBuilder {
    /// The namespace's segments joined with `:`, and a final `:` (empty
    /// without a namespace): what every full key starts with.
    prefix: String,
    secret: Option<Vec<u8>>,
    /// Django's `"{KEY_PREFIX}:{VERSION}:"`, put before the finished key.
    django: Option<String>,
}

impl std::fmt::Debug for KeyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyBuilder")
            .field("prefix", &self.prefix)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("django", &self.django)
            .finish()
    }
}

impl KeyBuilder {
    /// A builder with a one-segment namespace (Djblets' site domain). An
    /// empty string means no namespace.
    pub fn new(namespace: impl Into<String>) -> Self {
        let ns: String = namespace.into();
        Self {
            prefix: if ns.is_empty() { ns } else { ns + ":" },
            secret: None,
            django: None,
        }
    }

    /// A builder whose namespace has several segments, joined with `:` and
    /// not escaped (Djblets' site domain followed by its site root).
    pub fn with_namespace<I, S>(segments: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut prefix = String::new();
        for s in segments {
            prefix.push_str(&s.into());
            prefix.push(':');
        }
        Self {
            prefix,
            secret: None,
            django: None,
        }
    }

    /// Keys as Django's cache names them, for locks shared with djblets'
    /// `CacheLock` (with [`Compat::Django`](crate::Compat::Django)):
    /// `"{key_prefix}:{version}:{key}"`, Django's default `make_key` with
    /// its `KEY_PREFIX` and `VERSION` settings (defaults `""` and `1`).
    ///
    /// `{key}` is what djblets' `make_cache_key` makes of the lock's key:
    /// the key itself where the Django project has no sites app, else
    /// `"{site domain}:{key}"` (give the domain as part of the key). The
    /// escaping, length limit and [`secret`](Self::secret) apply to that
    /// part only, as in djblets; keys stay the same as djblets' while that
    /// part is at most [`MAX_KEY_LEN`] bytes of printable ASCII.
    ///
    /// ```
    /// use cachelock::KeyBuilder;
    ///
    /// assert_eq!(KeyBuilder::django("", 1).build("nightly"), ":1:nightly");
    /// assert_eq!(KeyBuilder::django("app", 3).build("example.com:k"), "app:3:example.com:k");
    /// ```
    pub fn django(key_prefix: &str, version: u32) -> Self {
        Self {
            prefix: String::new(),
            secret: None,
            django: Some(format!("{key_prefix}:{version}:")),
        }
    }

    /// With a secret, every key becomes the hex HMAC-SHA256 of the full key,
    /// so key names leak nothing to whoever can list the cache.
    #[must_use]
    pub fn secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Whether keys are HMAC'd.
    pub fn has_secret(&self) -> bool {
        self.secret.is_some()
    }

    /// Builds the full key for `key`.
    pub fn build(&self, key: impl Into<CacheKey>) -> String {
        self.build_key(&key.into())
    }

    /// Builds the full key for a [`CacheKey`] without consuming it.
    pub fn build_key(&self, key: &CacheKey) -> String {
        // One allocation on the common path: the prefix and the key (or
        // its escaped parts) are written straight into it, and checked in
        // one pass (this is on every memoize hit).
        let full = match key {
            CacheKey::Plain(k) => {
                let mut full = String::with_capacity(self.prefix.len() + k.len());
                full.push_str(&self.prefix);
                full.push_str(k);
                full
            }
            CacheKey::Parts(parts) => {
                let len: usize = parts.iter().map(|p| p.len() + 1).sum();
                let mut full = String::with_capacity(self.prefix.len() + len + 8);
                full.push_str(&self.prefix);
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        full.push(':');
                    }
                    push_escaped_part(&mut full, p);
                }
                if parts.is_empty() {
                    // No part: the namespace alone, without its separator.
                    full.pop();
                }
                full
            }
        };
        let finished = match &self.secret {
            Some(secret) => hmac_hex(secret, full.as_bytes()),
            None => limit_length(escape_invalid(full)),
        };
        match &self.django {
            Some(prefix) => format!("{prefix}{finished}"),
            None => finished,
        }
    }

    /// The default lock key for a value stored under `key`:
    /// [`LOCK_KEY_MARKER`] put before it as a first part, built by the same
    /// rules (and the same secret).
    pub fn lock_key(&self, key: &CacheKey) -> String {
        self.build_key(&key.prefixed(LOCK_KEY_MARKER))
    }
}

/// Appends one key part, escaped: `%` becomes `%25`, `:` becomes `%3A`.
fn push_escaped_part(out: &mut String, part: &str) {
    if !part.contains(['%', ':']) {
        out.push_str(part);
        return;
    }
    for c in part.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            c => out.push(c),
        }
    }
}

/// Replaces bytes `0x00..=0x20` and `0x7f` with the literal text `\xNN`.
///
/// A backslash becomes `\x5c` too, so the escape is one-to-one: the seed left
/// backslashes alone, which made `"a\0b"` and the literal text `"a\x00b"`
/// one key.
fn escape_invalid(key: String) -> String {
    // No early exit: a plain fold over the bytes is vectorized.
    let needs = key
        .bytes()
        .fold(false, |any, b| any | is_invalid_byte(b) | (b == b'\\'));
    if !needs {
        return key;
    }
    let mut out = String::with_capacity(key.len() + 16);
    for c in key.chars() {
        if c.is_ascii() && (is_invalid_byte(c as u8) || c == '\\') {
            out.push_str(&format!("\\x{:02x}", c as u8));
        } else {
            out.push(c);
        }
    }
    out
}

fn is_invalid_byte(b: u8) -> bool {
    (b <= 0x20) | (b == 0x7f)
}

/// Keeps keys within [`MAX_KEY_LEN`] bytes: a longer one keeps its first
/// 174 bytes (cut back to a character boundary), then [`HASHED_KEY_MARKER`]
/// (`\#`), then the hex SHA-256 of the whole key.
///
/// One-to-one: a key that fits is returned as it is and, being escaped,
/// never contains the marker, while every shortened key does; two shortened
/// keys are equal only if SHA-256 collides. (Without the marker, the literal
/// text of a shortened key was itself a key that fits, and named the same
/// cache entry as the long key it came from.)
fn limit_length(key: String) -> String {
    if key.len() <= MAX_KEY_LEN {
        return key;
    }
    let mut cut = KEPT_PREFIX_LEN;
    while !key.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    format!("{}{HASHED_KEY_MARKER}{digest}", &key[..cut])
}

fn hmac_hex(secret: &[u8], data: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

/// Whether `key` is valid as it is for Memcached's text protocol.
pub fn is_memcached_safe(key: &str) -> bool {
    key.len() <= MAX_KEY_LEN && !key.bytes().any(is_invalid_byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex() -> KeyBuilder {
        KeyBuilder::new("example.com")
    }

    #[test]
    fn plain_key_is_used_as_is() {
        assert_eq!(ex().build("test123"), "example.com:test123");
        assert_eq!(KeyBuilder::new("").build("test123"), "test123");
        assert_eq!(KeyBuilder::default().build("a:b%"), "a:b%");
    }

    #[test]
    fn no_parts_is_the_namespace_alone() {
        let none: [&str; 0] = [];
        assert_eq!(ex().build(none), "example.com");
        assert_eq!(KeyBuilder::with_namespace(["a", "b"]).build(none), "a:b");
        assert_eq!(KeyBuilder::default().build(none), "");
        assert_eq!(ex().build(""), "example.com:");
    }

    #[test]
    fn parts_are_escaped_and_joined() {
        assert_eq!(
            ex().build(["%test%", "%1:2:3%"]),
            "example.com:%25test%25:%251%3A2%3A3%25"
        );
        assert_eq!(ex().build(("test", "123")), "example.com:test:123");
        assert_eq!(KeyBuilder::default().build(["test", ":123"]), "test:%3A123");
    }

    #[test]
    fn one_part_key_is_escaped_too() {
        // The original left ["a:b%"] unescaped, so it collided with ["a", "b%"].
        assert_eq!(ex().build(["a:b%"]), "example.com:a%3Ab%25");
        assert_ne!(ex().build(["a:b"]), ex().build(["a", "b"]));
    }

    #[test]
    fn namespace_with_several_segments() {
        let keys = KeyBuilder::with_namespace(["example.com", "/subdir/"]);
        assert_eq!(keys.build("test123"), "example.com:/subdir/:test123");
        assert_eq!(
            keys.build(["test", ":123"]),
            "example.com:/subdir/:test:%3A123"
        );
    }

    #[test]
    fn unicode_passes_through() {
        assert_eq!(ex().build("test🥳123"), "example.com:test🥳123");
        assert_eq!(ex().build([":test", "🥳123"]), "example.com:%3Atest:🥳123");
    }

    #[test]
    fn invalid_bytes_become_hex_text() {
        assert_eq!(
            ex().build("test\0\tkey !\"\x7f"),
            r#"example.com:test\x00\x09key\x20!"\x7f"#
        );
        assert_eq!(
            ex().build(["t:est\0\t", "k%ey !\"\x7f"]),
            r#"example.com:t%3Aest\x00\x09:k%25ey\x20!"\x7f"#
        );
    }

    #[test]
    fn backslashes_are_escaped_so_escapes_cannot_collide() {
        assert_eq!(ex().build("a\\b"), r"example.com:a\x5cb");
        assert_ne!(ex().build("a\0b"), ex().build(r"a\x00b"));
    }

    #[test]
    fn length_limit_at_and_over() {
        let at = ex().build("x".repeat(228));
        assert_eq!(at, format!("example.com:{}", "x".repeat(228)));
        assert_eq!(at.len(), 240);

        let over = ex().build("x".repeat(229));
        assert_eq!(
            over,
            format!(
                "example.com:{}\\#edf8474a1b91e737ec28252abe7a8aa5604539b239505e8ccad8890a44198c58",
                "x".repeat(162)
            )
        );

        let parts_at = ex().build(["x".repeat(10).as_str(), "x".repeat(217).as_str()]);
        assert_eq!(parts_at.len(), 240);
        let parts_over = ex().build(["x".repeat(10).as_str(), "x".repeat(218).as_str()]);
        assert_eq!(
            parts_over,
            format!(
                "example.com:xxxxxxxxxx:{}\\#c1f6edf6f476acb93b1858f99ee2fbe8dac1907d595c7f9f9d211fe7c46335c1",
                "x".repeat(151)
            )
        );
    }

    #[test]
    fn a_shortened_key_and_its_literal_text_are_different_keys() {
        // Issue 10, item 11: the 240-byte shortened form of a 300-byte key,
        // given as a key of its own, fits and was used as it is: both named
        // one cache entry (and one lock).
        let keys = ex();
        let long = keys.build("x".repeat(300));
        let literal = long.strip_prefix("example.com:").unwrap();
        assert_ne!(keys.build(literal), long);
        let parts = keys.build(["a".repeat(150).as_str(), "b".repeat(150).as_str()]);
        let literal = parts.strip_prefix("example.com:").unwrap();
        assert_ne!(keys.build(literal), parts);
        assert!(long.contains(HASHED_KEY_MARKER), "{long}");
    }

    #[test]
    fn length_limit_counts_bytes() {
        let key = ex().build("é".repeat(300));
        assert!(key.len() <= MAX_KEY_LEN, "{} bytes", key.len());
        assert!(key.starts_with("example.com:é"));
    }

    #[test]
    fn secret_gives_hmac() {
        let k = ex().secret("af=y9ydd51a0g#be");
        assert_eq!(
            k.build("abc123"),
            "0a3195ea908f9bd178ab3c67a257ea4e7954e4b67ac240d1c86953953cde3a0b"
        );
        assert_eq!(
            k.build(("abc", "123")),
            "61f180a36b711a5364235cc13096d237b5b27256be8aa78e723faf1d73237851"
        );
        let k = ex().secret("0123456789abcdef");
        assert_eq!(
            k.build("abc123"),
            "10c4714f5c6c49045ed25c8da7d04a4be2254fa275fc3b63bdeebe887aee52f9"
        );
        assert_eq!(
            k.build(("abc", "123")),
            "c93f54fcf3063f17a1bb59d74e3ecd146a1154ea0bf7a4a7d95c82e71c56be7e"
        );
        assert!(!format!("{k:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn lock_keys() {
        assert_eq!(ex().lock_key(&"abc123".into()), "example.com:_lock_:abc123");
        assert_eq!(
            ex().lock_key(&["a", "b:c"].into()),
            "example.com:_lock_:a:b%3Ac"
        );
        let secret = ex().secret("s");
        assert_eq!(
            secret.lock_key(&"enc".into()),
            KeyBuilder::new("example.com")
                .secret("s")
                .build("_lock_:enc")
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn every_key_is_memcached_safe(
                ns in ".{0,40}",
                plain in any::<String>(),
                parts in proptest::collection::vec(any::<String>(), 0..6),
            ) {
                let keys = KeyBuilder::new(ns);
                let a = keys.build(plain.as_str());
                prop_assert!(is_memcached_safe(&a), "{a:?}");
                let b = keys.build(CacheKey::Parts(parts.clone()));
                prop_assert!(is_memcached_safe(&b), "{b:?}");
                // Deterministic.
                prop_assert_eq!(&b, &keys.build(CacheKey::Parts(parts)));
            }

            #[test]
            fn shortened_keys_never_equal_a_key_that_fits(
                ns in "[a-z.]{0,12}",
                long in "[ -~é]{241,400}",
                cut in 0usize..300,
            ) {
                // The literal text of a shortened key, or any piece of it,
                // built as a key of its own (plain or one part), must not
                // name the same entry (issue 10, item 11).
                let keys = KeyBuilder::new(ns.clone());
                let built = keys.build(long.as_str());
                let own = if ns.is_empty() {
                    built.clone()
                } else {
                    built.strip_prefix(&format!("{ns}:")).unwrap_or(&built).to_owned()
                };
                prop_assert_ne!(&keys.build(own.as_str()), &built);
                let mut end = cut.min(own.len());
                while !own.is_char_boundary(end) {
                    end -= 1;
                }
                let piece = &own[..end];
                prop_assert_ne!(&keys.build(piece), &built);
                prop_assert_ne!(&keys.build([piece]), &built);
            }

            #[test]
            fn distinct_parts_give_distinct_keys(
                a in proptest::collection::vec("[a-z:%]{0,6}", 1..4),
                b in proptest::collection::vec("[a-z:%]{0,6}", 1..4),
            ) {
                prop_assume!(a != b);
                let keys = KeyBuilder::new("ns");
                prop_assert_ne!(
                    keys.build(CacheKey::Parts(a)),
                    keys.build(CacheKey::Parts(b))
                );
            }
        }
    }
}
