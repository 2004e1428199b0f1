//! The one value shape shared with Django's cache: a pickled `str`.
//!
//! Django's `RedisCache` (and its database and local-memory caches) pickle
//! every value they store, so a lock taken by djblets' `CacheLock` holds
//! `pickle.dumps(token)`, and `cache.get` of a key holding anything that is
//! not a pickle (or a decimal number) raises `UnpicklingError`. A
//! Django-compatible lock therefore stores its token pickled the same way.
//!
//! Only that one shape is written or read here: [`pickle_str`] writes a
//! protocol-5 pickle of one `str` (what Python 3.8+ writes with Django's
//! default `pickle.HIGHEST_PROTOCOL`), and [`unpickle_str`] accepts exactly
//! a protocol 4 or 5 pickle of one `str` and nothing else. Nothing else is
//! ever unpickled: a pickle can run arbitrary code in the process that
//! loads it, so general pickles (djblets' memoized values among them) are
//! not read at all.

/// `PROTO`: the protocol number follows.
const PROTO: u8 = 0x80;
/// `FRAME`: an 8-byte little-endian frame length follows.
const FRAME: u8 = 0x95;
/// `SHORT_BINUNICODE`: a 1-byte length and UTF-8 bytes follow.
const SHORT_BINUNICODE: u8 = 0x8c;
/// `BINUNICODE`: a 4-byte little-endian length and UTF-8 bytes follow.
const BINUNICODE: u8 = b'X';
/// `BINUNICODE8`: an 8-byte little-endian length and UTF-8 bytes follow.
const BINUNICODE8: u8 = 0x8d;
/// `MEMOIZE`: store the top of the stack in the memo (no effect here).
const MEMOIZE: u8 = 0x94;
/// `STOP`: the end of the pickle.
const STOP: u8 = b'.';

/// `pickle.dumps(text, protocol=5)`, byte for byte as CPython writes it for
/// strings shorter than 64 KiB (longer ones are still a valid pickle of
/// the same string, in one frame).
///
/// ```
/// use cachelock::backend::django::pickle_str;
///
/// assert_eq!(pickle_str("abc"), b"\x80\x05\x95\x07\0\0\0\0\0\0\0\x8c\x03abc\x94.");
/// ```
pub fn pickle_str(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut body = Vec::with_capacity(bytes.len() + 12);
    if let Ok(n) = u8::try_from(bytes.len()) {
        body.push(SHORT_BINUNICODE);
        body.push(n);
    } else if let Ok(n) = u32::try_from(bytes.len()) {
        body.push(BINUNICODE);
        body.extend_from_slice(&n.to_le_bytes());
    } else {
        body.push(BINUNICODE8);
        body.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    }
    body.extend_from_slice(bytes);
    body.push(MEMOIZE);
    body.push(STOP);
    let mut out = Vec::with_capacity(body.len() + 11);
    out.push(PROTO);
    out.push(5);
    out.push(FRAME);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The string in a protocol 4 or 5 pickle of one `str`, or `None` for
/// anything else: another protocol, another type, a memo reference, any
/// opcode beyond `PROTO`, an optional `FRAME` covering exactly the rest,
/// one string opcode, an optional `MEMOIZE` and `STOP`, trailing bytes, a
/// length that does not match, or invalid UTF-8. It never runs anything: it
/// is a parser for that one shape, not an unpickler.
///
/// ```
/// use cachelock::backend::django::{pickle_str, unpickle_str};
///
/// assert_eq!(unpickle_str(&pickle_str("tok")).as_deref(), Some("tok"));
/// assert_eq!(unpickle_str(b"\x80\x05K\x01."), None); // the int 1
/// assert_eq!(unpickle_str(b"tok"), None);
/// ```
pub fn unpickle_str(data: &[u8]) -> Option<String> {
    let rest = match data {
        [PROTO, 4 | 5, rest @ ..] => rest,
        _ => return None,
    };
    let rest = match rest {
        [FRAME, rest @ ..] => {
            let (len, rest) = take_le(rest, 8)?;
            if usize::try_from(len).ok()? != rest.len() {
                return None;
            }
            rest
        }
        _ => rest,
    };
    let (len, rest) = match rest {
        [SHORT_BINUNICODE, rest @ ..] => take_le(rest, 1)?,
        [BINUNICODE, rest @ ..] => take_le(rest, 4)?,
        [BINUNICODE8, rest @ ..] => take_le(rest, 8)?,
        _ => return None,
    };
    let len = usize::try_from(len).ok()?;
    if rest.len() < len {
        return None;
    }
    let (text, tail) = rest.split_at(len);
    match tail {
        [MEMOIZE, STOP] | [STOP] => {}
        _ => return None,
    }
    String::from_utf8(text.to_vec()).ok()
}

/// A little-endian unsigned number of `n` bytes (at most 8) at the start of
/// `data`, and the bytes after it.
fn take_le(data: &[u8], n: usize) -> Option<(u64, &[u8])> {
    if data.len() < n || n > 8 {
        return None;
    }
    let (num, rest) = data.split_at(n);
    let mut buf = [0u8; 8];
    buf.get_mut(..n)?.copy_from_slice(num);
    Some((u64::from_le_bytes(buf), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pickle.dumps(s, 5)` from CPython 3.11 for these strings.
    #[test]
    fn matches_cpython() {
        assert_eq!(
            pickle_str("8f0c1a52-35de-4a43-a2d5-0b0f3c0e6c1d"),
            b"\x80\x05\x95(\0\0\0\0\0\0\0\x8c$8f0c1a52-35de-4a43-a2d5-0b0f3c0e6c1d\x94."
        );
        assert_eq!(pickle_str(""), b"\x80\x05\x95\x04\0\0\0\0\0\0\0\x8c\0\x94.");
        let long = "x".repeat(300);
        let mut want = b"\x80\x05\x95\x33\x01\0\0\0\0\0\0X\x2c\x01\0\0".to_vec();
        want.extend_from_slice(long.as_bytes());
        want.extend_from_slice(b"\x94.");
        assert_eq!(pickle_str(&long), want);
        // Protocol 4, unframed, as `pickle.dumps("é", 4)` writes short ones.
        assert_eq!(
            unpickle_str(b"\x80\x04\x8c\x02\xc3\xa9\x94.").as_deref(),
            Some("é")
        );
    }

    #[test]
    fn round_trips() {
        for s in [
            "",
            "a",
            "ünï",
            &"y".repeat(255),
            &"z".repeat(256),
            &"w".repeat(70_000),
        ] {
            assert_eq!(unpickle_str(&pickle_str(s)).as_deref(), Some(s));
        }
    }

    #[test]
    fn refuses_every_other_shape() {
        let good = pickle_str("tok");
        // Every truncation and every extension.
        for cut in 0..good.len() {
            assert_eq!(unpickle_str(&good[..cut]), None, "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.push(b'.');
        assert_eq!(unpickle_str(&longer), None);
        let refused: &[&[u8]] = &[
            b"\x80\x03X\x03\0\0\0tokq\0.",                     // protocol 3
            b"\x80\x05\x95\x05\0\0\0\0\0\0\0K\x01\x94.",       // an int
            b"\x80\x05\x95\x08\0\0\0\0\0\0\0\x8c\x03tok\x94.", // frame too long
            b"\x80\x05\x8c\x03tok\x94\x94.",                   // two memoizes
            b"\x80\x05\x8c\x02\xff\xfe\x94.",                  // not UTF-8
            b"\x80\x05\x8c\x03tok0.",                          // another opcode
            b"cos\nsystem\n(S'true'\ntR.",                     // the classic
            b"\x80\x05\x8c\x04tok\x94.",                       // length past the end
        ];
        for bad in refused {
            assert_eq!(unpickle_str(bad), None, "{bad:?}");
        }
    }
}
