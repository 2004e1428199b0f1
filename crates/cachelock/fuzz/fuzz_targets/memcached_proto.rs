//! The Memcached meta-protocol reply parser never panics, never claims to
//! have consumed more bytes than it was given, and parses a stream the same
//! however it is split.
#![no_main]

use cachelock::backend::memcached::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Whole buffer, reply after reply.
    let mut whole = Vec::new();
    let mut rest = data;
    while let Ok(Some((reply, used))) = proto::parse(rest) {
        assert!(used > 0 && used <= rest.len());
        whole.push(format!("{reply:?}"));
        rest = &rest[used..];
    }
    // The same bytes arriving in two pieces parse to the same replies.
    if data.len() > 1 {
        let cut = data[0] as usize % data.len();
        let mut buf = data[..cut].to_vec();
        let mut pieces = vec![&data[cut..]].into_iter();
        let mut split = Vec::new();
        loop {
            match proto::parse(&buf) {
                Ok(Some((reply, used))) => {
                    split.push(format!("{reply:?}"));
                    buf.drain(..used);
                }
                Ok(None) => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => break,
                },
                Err(_) => break,
            }
        }
        assert_eq!(split, whole);
    }
    let _ = proto::parse_stats(data);
});
