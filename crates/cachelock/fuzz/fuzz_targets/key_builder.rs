//! Any namespace and key parts give a key that is valid for Memcached
//! (<= 240 bytes, no control bytes, no space, no DEL), the same key every
//! time, and never a panic.
#![no_main]

use cachelock::key::{CacheKey, KeyBuilder, is_memcached_safe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.split('\u{1}');
    let namespace = fields.next().unwrap_or_default().to_owned();
    let parts: Vec<String> = fields.map(str::to_owned).collect();
    let keys = KeyBuilder::new(namespace.clone());
    let plain = keys.build(text.as_ref());
    assert!(is_memcached_safe(&plain), "{plain:?}");
    let key = CacheKey::Parts(parts);
    let built = keys.build_key(&key);
    assert!(is_memcached_safe(&built), "{built:?}");
    assert_eq!(built, keys.build_key(&key));
    let hashed = keys.clone().secret(namespace.into_bytes()).build_key(&key);
    assert_eq!(hashed.len(), 64);
    assert!(is_memcached_safe(&hashed));
});
