//! The Memcached meta protocol as pure functions over bytes: request
//! encoding and incremental response parsing, with no I/O.
//!
//! Requests are appended to a caller's `Vec<u8>` (so several can be
//! pipelined in one write). Responses are read with [`parse`], which looks
//! at the bytes received so far and returns either one complete
//! [`Response`] and how many bytes it used, `Ok(None)` if more bytes are
//! needed, or a [`ProtoError`] if the bytes cannot be a valid reply (the
//! connection is then out of step and must be dropped).
//!
//! The parser never panics, whatever the input, and never allocates on the
//! strength of a length it was told: a value's bytes are copied only once
//! they have all arrived, and lines and values have hard limits
//! ([`MAX_LINE_LEN`], the `max_value_len` of [`parse_with_limit`]).
//!
//! Covered: `mg` (get, touch with `T`, TTL with `t`, CAS with `c`), `ms`
//! (set/add/replace modes, CAS-guarded with `C`), `md` (optionally
//! CAS-guarded), `ma` (incr with auto-vivify), `mn`, and `stats settings`.
//! Written against memcached 1.6.18's `protocol.txt`.

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Memcached's longest key, in bytes (as sent on the wire).
pub const MAX_KEY_LEN: usize = 250;

/// The longest response line the parser accepts (status code and flags,
/// without the value block). Real replies are far shorter.
pub const MAX_LINE_LEN: usize = 8192;

/// The largest value block [`parse`] accepts: 1 GiB, memcached's own
/// ceiling for `-I`.
pub const DEFAULT_MAX_VALUE_LEN: usize = 1 << 30;

/// The most `STAT` lines [`parse_stats`] accepts in one reply.
pub const MAX_STATS_LINES: usize = 4096;

/// The longest key sent base64-encoded; longer keys are hashed first
/// (base64 of 186 bytes is 248 characters, within [`MAX_KEY_LEN`]).
const MAX_BASE64_RAW: usize = 186;

/// Marks a hashed key. `0xFF` never occurs in UTF-8, so no key given as a
/// `&str` can have the same bytes as a hashed one.
const HASHED_KEY_MARK: u8 = 0xFF;

/// A cache key in the form it is sent in.
///
/// * A key of 1 to 250 printable ASCII bytes (no space, no control
///   character) is sent as it is.
/// * Any other key of up to 186 bytes is sent base64-encoded with the `b`
///   flag: memcached decodes it and stores the exact bytes.
/// * A longer (or empty) key is replaced by `0xFF` + its SHA-256 digest,
///   sent base64-encoded with `b`. Since `0xFF` never occurs in UTF-8, such
///   a key cannot collide with any other key as given; two long keys
///   collide only if SHA-256 does.
///
/// Plain and base64 keys cannot collide either: a key is base64-encoded
/// only when it could not be sent plain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireKey {
    text: String,
    binary: bool,
}

impl WireKey {
    /// Encodes `key` for the wire (see the type's docs).
    pub fn new(key: &str) -> Self {
        let raw = key.as_bytes();
        if is_plain_key(raw) {
            return Self {
                text: key.to_owned(),
                binary: false,
            };
        }
        let text = if !raw.is_empty() && raw.len() <= MAX_BASE64_RAW {
            BASE64.encode(raw)
        } else {
            let mut hashed = Vec::with_capacity(33);
            hashed.push(HASHED_KEY_MARK);
            hashed.extend_from_slice(&Sha256::digest(raw));
            BASE64.encode(&hashed)
        };
        Self { text, binary: true }
    }

    /// The key as it appears on the command line.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the key is sent base64-encoded (with the `b` flag).
    pub fn is_binary(&self) -> bool {
        self.binary
    }
}

/// True if `key` can be sent as it is: 1 to 250 bytes, each printable
/// ASCII other than space.
pub fn is_plain_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// The mode of a meta set (`M` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SetMode {
    /// Store unconditionally (`MS`, the default).
    #[default]
    Set,
    /// Store only if the key is absent (`ME`, the "add" command).
    Add,
    /// Store only if the key is present (`MR`).
    Replace,
}

/// Flags of a meta get (`mg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GetFlags {
    /// `v`: return the value.
    pub value: bool,
    /// `c`: return the CAS token.
    pub cas: bool,
    /// `t`: return the remaining TTL in seconds (`-1`: never expires).
    pub ttl: bool,
    /// `T<secs>`: set a new TTL if the item exists (a touch).
    pub touch: Option<i64>,
    /// `f`: return the item's client flags.
    pub client_flags: bool,
    /// `q`: no reply on a miss (use with [`encode_noop`]).
    pub quiet: bool,
    /// `O<n>`: an opaque number echoed in the reply.
    pub opaque: Option<u32>,
}

/// Flags of a meta set (`ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetFlags {
    /// `M<mode>`; nothing is sent for [`SetMode::Set`].
    pub mode: SetMode,
    /// `T<secs>`: the TTL (`0`: never expires; over 30 days: Unix time).
    pub ttl: i64,
    /// `C<cas>`: store only if the item's CAS token is this one.
    pub compare_cas: Option<u64>,
    /// `F<n>`: the item's client flags (`None`: 0). Django's
    /// `PyMemcacheCache` stores a `str` as UTF-8 with flags 16.
    pub client_flags: Option<u32>,
    /// `c`: return the stored item's CAS token.
    pub return_cas: bool,
    /// `q`: no reply on success.
    pub quiet: bool,
    /// `O<n>`: an opaque number echoed in the reply.
    pub opaque: Option<u32>,
}

fn push_key(buf: &mut Vec<u8>, cmd: &str, key: &WireKey) {
    buf.extend_from_slice(cmd.as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(key.text.as_bytes());
}

/// Lets `write!` append to a byte buffer without an intermediate `String`.
struct Writer<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn push_flag(buf: &mut Vec<u8>, flag: char, token: impl std::fmt::Display) {
    let _ = write!(Writer(buf), " {flag}{token}");
}

fn push_bare(buf: &mut Vec<u8>, flag: u8) {
    buf.push(b' ');
    buf.push(flag);
}

fn push_common(buf: &mut Vec<u8>, key: &WireKey, quiet: bool, opaque: Option<u32>) {
    if key.binary {
        push_bare(buf, b'b');
    }
    if quiet {
        push_bare(buf, b'q');
    }
    if let Some(o) = opaque {
        push_flag(buf, 'O', o);
    }
}

/// Appends `mg <key> <flags>\r\n`.
pub fn encode_get(buf: &mut Vec<u8>, key: &WireKey, flags: &GetFlags) {
    push_key(buf, "mg", key);
    if flags.value {
        push_bare(buf, b'v');
    }
    if flags.cas {
        push_bare(buf, b'c');
    }
    if flags.ttl {
        push_bare(buf, b't');
    }
    if flags.client_flags {
        push_bare(buf, b'f');
    }
    if let Some(t) = flags.touch {
        push_flag(buf, 'T', t);
    }
    push_common(buf, key, flags.quiet, flags.opaque);
    buf.extend_from_slice(b"\r\n");
}

/// Appends `ms <key> <len> <flags>\r\n<value>\r\n`.
pub fn encode_set(buf: &mut Vec<u8>, key: &WireKey, value: &[u8], flags: &SetFlags) {
    buf.reserve(key.text.len() + value.len() + 64);
    push_key(buf, "ms", key);
    let _ = write!(Writer(buf), " {}", value.len());
    push_flag(buf, 'T', flags.ttl);
    match flags.mode {
        SetMode::Set => {}
        SetMode::Add => push_flag(buf, 'M', 'E'),
        SetMode::Replace => push_flag(buf, 'M', 'R'),
    }
    if let Some(cas) = flags.compare_cas {
        push_flag(buf, 'C', cas);
    }
    if let Some(client_flags) = flags.client_flags {
        push_flag(buf, 'F', client_flags);
    }
    if flags.return_cas {
        push_bare(buf, b'c');
    }
    push_common(buf, key, flags.quiet, flags.opaque);
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(value);
    buf.extend_from_slice(b"\r\n");
}

/// Appends `md <key> [C<cas>] <flags>\r\n`.
pub fn encode_delete(
    buf: &mut Vec<u8>,
    key: &WireKey,
    compare_cas: Option<u64>,
    quiet: bool,
    opaque: Option<u32>,
) {
    push_key(buf, "md", key);
    if let Some(cas) = compare_cas {
        push_flag(buf, 'C', cas);
    }
    push_common(buf, key, quiet, opaque);
    buf.extend_from_slice(b"\r\n");
}

/// Appends `ma <key> D<delta> v [N<ttl> J<initial>]\r\n`: an increment
/// that returns the new value. With `vivify = Some((ttl, initial))`, a
/// missing item is created holding `initial` (the delta is not added to
/// it) with the given TTL (`0`: never expires).
pub fn encode_incr(buf: &mut Vec<u8>, key: &WireKey, delta: u64, vivify: Option<(i64, u64)>) {
    push_key(buf, "ma", key);
    push_flag(buf, 'D', delta);
    push_bare(buf, b'v');
    if let Some((ttl, initial)) = vivify {
        push_flag(buf, 'N', ttl);
        push_flag(buf, 'J', initial);
    }
    push_common(buf, key, false, None);
    buf.extend_from_slice(b"\r\n");
}

/// Appends `ma <key> D1 v N<ttl> J<floor> T<ttl>\r\n`: the next fence.
/// A missing counter is created holding `floor` (and that is returned); an
/// existing one is incremented; either way its TTL becomes `ttl`.
pub fn encode_fence(buf: &mut Vec<u8>, key: &WireKey, floor: u64, ttl: i64) {
    push_key(buf, "ma", key);
    push_flag(buf, 'D', 1);
    push_bare(buf, b'v');
    push_flag(buf, 'N', ttl);
    push_flag(buf, 'J', floor);
    push_flag(buf, 'T', ttl);
    push_common(buf, key, false, None);
    buf.extend_from_slice(b"\r\n");
}

/// Appends `mn\r\n`, answered by `MN\r\n` once everything before it is done.
pub fn encode_noop(buf: &mut Vec<u8>) {
    buf.extend_from_slice(b"mn\r\n");
}

/// Appends `stats settings\r\n` (see [`parse_stats`]).
pub fn encode_stats_settings(buf: &mut Vec<u8>) {
    buf.extend_from_slice(b"stats settings\r\n");
}

/// The status code of a meta reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `VA`: a value follows.
    Value,
    /// `HD`: success, no value.
    Ok,
    /// `EN`: miss (`mg`).
    Miss,
    /// `NS`: not stored (for example an add of a present key).
    NotStored,
    /// `EX`: the CAS token did not match.
    Exists,
    /// `NF`: not found.
    NotFound,
    /// `MN`: the reply to `mn`.
    Noop,
}

/// Flags returned in a meta reply. Unknown flags are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplyFlags {
    /// `c<cas>`: the item's CAS token.
    pub cas: Option<u64>,
    /// `t<secs>`: remaining TTL, `-1` for none.
    pub ttl: Option<i64>,
    /// `f<n>`: the item's client flags.
    pub client_flags: Option<u32>,
    /// `O<n>`: the opaque number sent with the request.
    pub opaque: Option<u32>,
    /// `W`: this client won the right to recache.
    pub won: bool,
    /// `X`: the item is stale.
    pub stale: bool,
    /// `Z`: another client already won.
    pub already_won: bool,
}

/// What kind of error line the server sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `ERROR`: unknown command.
    Error,
    /// `CLIENT_ERROR <msg>`: the request was malformed or not allowed.
    Client,
    /// `SERVER_ERROR <msg>`: the server could not do it.
    Server,
}

/// One complete reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// A meta reply: a status, its flags, and for `VA` the value.
    Meta {
        /// The status code.
        status: Status,
        /// The returned flags.
        flags: ReplyFlags,
        /// The value block (`VA` only).
        value: Option<Bytes>,
    },
    /// An error line. After one, a pipelined connection may be out of step
    /// (memcached can read the rest of a bad request as commands); the
    /// transport drops it.
    Error {
        /// Which error line.
        kind: ErrorKind,
        /// The server's message (may be empty), at most 512 bytes.
        message: String,
    },
}

impl Response {
    /// The status, for a meta reply.
    pub fn status(&self) -> Option<Status> {
        match self {
            Self::Meta { status, .. } => Some(*status),
            Self::Error { .. } => None,
        }
    }
}

/// Bytes that cannot be a reply: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// No line end within [`MAX_LINE_LEN`] bytes.
    #[error("reply line longer than {MAX_LINE_LEN} bytes")]
    LineTooLong,
    /// A status code the client does not know.
    #[error("unknown reply {0:?}")]
    UnknownReply(String),
    /// A malformed reply line.
    #[error("malformed reply line: {0}")]
    BadLine(String),
    /// A value longer than allowed.
    #[error("value of {len} bytes exceeds the limit of {max}")]
    ValueTooLong {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value block not followed by `\r\n`.
    #[error("value block not terminated by \\r\\n")]
    BadValueTerminator,
}

fn excerpt(bytes: &[u8]) -> String {
    let cut = bytes.get(..bytes.len().min(128)).unwrap_or_default();
    String::from_utf8_lossy(cut).into_owned()
}

/// Finds the next `\r\n`-terminated line: `Ok(Some((line, consumed)))`.
fn next_line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, ProtoError> {
    let window = buf
        .get(..buf.len().min(MAX_LINE_LEN + 2))
        .unwrap_or_default();
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Ok(Some((window.get(..end).unwrap_or_default(), end + 2))),
        None if buf.len() >= MAX_LINE_LEN + 2 => Err(ProtoError::LineTooLong),
        None => Ok(None),
    }
}

fn parse_num<T: std::str::FromStr>(token: &[u8], what: &str) -> Result<T, ProtoError> {
    std::str::from_utf8(token)
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 20)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ProtoError::BadLine(format!("bad {what} {:?}", excerpt(token))))
}

fn parse_flags<'a>(tokens: impl Iterator<Item = &'a [u8]>) -> Result<ReplyFlags, ProtoError> {
    let mut flags = ReplyFlags::default();
    for token in tokens {
        let Some((&flag, rest)) = token.split_first() else {
            continue;
        };
        match flag {
            b'c' => flags.cas = Some(parse_num(rest, "CAS token")?),
            b't' => flags.ttl = Some(parse_num(rest, "TTL")?),
            b'f' => flags.client_flags = Some(parse_num(rest, "client flags")?),
            b'O' => flags.opaque = Some(parse_num(rest, "opaque")?),
            b'W' => flags.won = true,
            b'X' => flags.stale = true,
            b'Z' => flags.already_won = true,
            _ => {}
        }
    }
    Ok(flags)
}

/// [`parse_with_limit`] with [`DEFAULT_MAX_VALUE_LEN`].
pub fn parse(buf: &[u8]) -> Result<Option<(Response, usize)>, ProtoError> {
    parse_with_limit(buf, DEFAULT_MAX_VALUE_LEN)
}

/// Parses one reply from the start of `buf`.
///
/// Returns `Ok(Some((reply, consumed)))` when a whole reply is there,
/// `Ok(None)` when more bytes are needed, and an error for bytes that
/// cannot be a reply (or a value longer than `max_value_len`).
pub fn parse_with_limit(
    buf: &[u8],
    max_value_len: usize,
) -> Result<Option<(Response, usize)>, ProtoError> {
    let Some((line, line_len)) = next_line(buf)? else {
        return Ok(None);
    };
    let mut tokens = line.split(|&b| b == b' ');
    let code = tokens.next().unwrap_or_default();
    let status = match code {
        b"VA" => Status::Value,
        b"HD" => Status::Ok,
        b"EN" => Status::Miss,
        b"NS" => Status::NotStored,
        b"EX" => Status::Exists,
        b"NF" => Status::NotFound,
        b"MN" => Status::Noop,
        b"ERROR" | b"CLIENT_ERROR" | b"SERVER_ERROR" => {
            let kind = match code {
                b"ERROR" => ErrorKind::Error,
                b"CLIENT_ERROR" => ErrorKind::Client,
                _ => ErrorKind::Server,
            };
            let msg = line.get(code.len()..).unwrap_or_default().trim_ascii();
            let msg = msg.get(..msg.len().min(512)).unwrap_or_default();
            let message = String::from_utf8_lossy(msg).into_owned();
            return Ok(Some((Response::Error { kind, message }, line_len)));
        }
        other => return Err(ProtoError::UnknownReply(excerpt(other))),
    };
    if status != Status::Value {
        let flags = parse_flags(tokens)?;
        let reply = Response::Meta {
            status,
            flags,
            value: None,
        };
        return Ok(Some((reply, line_len)));
    }
    let size_token = tokens
        .next()
        .ok_or_else(|| ProtoError::BadLine("VA without a size".into()))?;
    let size: usize = parse_num(size_token, "value size")?;
    if size > max_value_len {
        return Err(ProtoError::ValueTooLong {
            len: size,
            max: max_value_len,
        });
    }
    let flags = parse_flags(tokens)?;
    let Some(total) = line_len.checked_add(size).and_then(|n| n.checked_add(2)) else {
        return Err(ProtoError::ValueTooLong {
            len: size,
            max: max_value_len,
        });
    };
    if buf.len() < total {
        return Ok(None);
    }
    let block = buf.get(line_len..line_len + size).unwrap_or_default();
    if buf.get(line_len + size..total) != Some(&b"\r\n"[..]) {
        return Err(ProtoError::BadValueTerminator);
    }
    let reply = Response::Meta {
        status,
        flags,
        value: Some(Bytes::copy_from_slice(block)),
    };
    Ok(Some((reply, total)))
}

/// Parses a whole `stats` reply (`STAT <name> <value>` lines up to `END`).
///
/// Returns the pairs and the bytes used, `Ok(None)` if the `END` line has
/// not arrived yet, or an error for anything else (an error line from the
/// server included, as [`ProtoError::UnknownReply`]).
#[allow(clippy::type_complexity)]
pub fn parse_stats(buf: &[u8]) -> Result<Option<(Vec<(String, String)>, usize)>, ProtoError> {
    let mut pos = 0;
    let mut stats = Vec::new();
    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        let Some((line, used)) = next_line(rest)? else {
            return Ok(None);
        };
        pos += used;
        if line == b"END" {
            return Ok(Some((stats, pos)));
        }
        let mut tokens = line.splitn(3, |&b| b == b' ');
        match (tokens.next(), tokens.next(), tokens.next()) {
            (Some(b"STAT"), Some(name), value) => {
                if stats.len() >= MAX_STATS_LINES {
                    return Err(ProtoError::BadLine("too many STAT lines".into()));
                }
                let value = value.unwrap_or_default();
                stats.push((
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                ));
            }
            _ => return Err(ProtoError::UnknownReply(excerpt(line))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut buf = Vec::new();
        f(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn keys_plain_base64_hashed() {
        let k = WireKey::new("a:b/c");
        assert_eq!((k.as_str(), k.is_binary()), ("a:b/c", false));
        let k = WireKey::new("a b");
        assert_eq!((k.as_str(), k.is_binary()), ("YSBi", true));
        let k = WireKey::new("ünï");
        assert!(k.is_binary());
        assert_eq!(BASE64.decode(k.as_str()).unwrap(), "ünï".as_bytes());
        let exact = "x".repeat(250);
        assert!(!WireKey::new(&exact).is_binary());
        let long = "x".repeat(251);
        let k = WireKey::new(&long);
        assert!(k.is_binary());
        let raw = BASE64.decode(k.as_str()).unwrap();
        assert_eq!(raw.len(), 33);
        assert_eq!(raw[0], 0xFF);
        assert_ne!(k, WireKey::new(&"x".repeat(252)));
        let k = WireKey::new(&"é".repeat(93)); // 186 bytes: still base64
        assert!(k.as_str().len() <= MAX_KEY_LEN);
        assert_eq!(BASE64.decode(k.as_str()).unwrap().len(), 186);
        let k = WireKey::new(&format!("{}!", "é".repeat(93))); // 187 bytes: hashed
        assert_eq!(BASE64.decode(k.as_str()).unwrap().len(), 33);
        assert!(WireKey::new("").is_binary());
    }

    #[test]
    fn encodes_requests() {
        let key = WireKey::new("k");
        let get = GetFlags {
            value: true,
            cas: true,
            ..Default::default()
        };
        assert_eq!(enc(|b| encode_get(b, &key, &get)), "mg k v c\r\n");
        let touch = GetFlags {
            touch: Some(30),
            ..Default::default()
        };
        assert_eq!(enc(|b| encode_get(b, &key, &touch)), "mg k T30\r\n");
        let quiet = GetFlags {
            value: true,
            quiet: true,
            opaque: Some(7),
            ..Default::default()
        };
        assert_eq!(
            enc(|b| encode_get(b, &WireKey::new("a b"), &quiet)),
            "mg YSBi v b q O7\r\n"
        );
        let add = SetFlags {
            mode: SetMode::Add,
            ttl: 5,
            ..Default::default()
        };
        assert_eq!(
            enc(|b| encode_set(b, &key, b"v\r\n", &add)),
            "ms k 3 T5 ME\r\nv\r\n\r\n"
        );
        let cas = SetFlags {
            ttl: 60,
            compare_cas: Some(99),
            ..Default::default()
        };
        assert_eq!(
            enc(|b| encode_set(b, &key, b"", &cas)),
            "ms k 0 T60 C99\r\n\r\n"
        );
        assert_eq!(
            enc(|b| encode_delete(b, &key, Some(12), false, None)),
            "md k C12\r\n"
        );
        assert_eq!(
            enc(|b| encode_incr(b, &key, 5, Some((0, 5)))),
            "ma k D5 v N0 J5\r\n"
        );
        assert_eq!(enc(encode_noop), "mn\r\n");
        assert_eq!(enc(encode_stats_settings), "stats settings\r\n");
    }

    #[test]
    fn parses_replies() {
        let (r, n) = parse(b"VA 3 c4 t99 O12\r\nabc\r\nMN\r\n").unwrap().unwrap();
        assert_eq!(n, 22);
        assert_eq!(
            r,
            Response::Meta {
                status: Status::Value,
                flags: ReplyFlags {
                    cas: Some(4),
                    ttl: Some(99),
                    opaque: Some(12),
                    ..Default::default()
                },
                value: Some(Bytes::from_static(b"abc")),
            }
        );
        let (r, n) = parse(b"HD t-1\r\n").unwrap().unwrap();
        assert_eq!(n, 8);
        assert_eq!(r.status(), Some(Status::Ok));
        for (line, status) in [
            (&b"EN\r\n"[..], Status::Miss),
            (b"NS c0\r\n", Status::NotStored),
            (b"EX\r\n", Status::Exists),
            (b"NF\r\n", Status::NotFound),
            (b"MN\r\n", Status::Noop),
        ] {
            assert_eq!(parse(line).unwrap().unwrap().0.status(), Some(status));
        }
        let (r, _) = parse(b"SERVER_ERROR object too large for cache\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            r,
            Response::Error {
                kind: ErrorKind::Server,
                message: "object too large for cache".into()
            }
        );
        let (r, _) = parse(b"ERROR\r\n").unwrap().unwrap();
        assert!(matches!(
            r,
            Response::Error {
                kind: ErrorKind::Error,
                ..
            }
        ));
        // A value with \r\n inside it.
        let (r, _) = parse(b"VA 4\r\n\r\n\r\n\r\n").unwrap().unwrap();
        assert!(matches!(r, Response::Meta { value: Some(v), .. } if v.as_ref() == b"\r\n\r\n"));
    }

    #[test]
    fn incomplete_and_bad_replies() {
        let full = b"VA 10 c1\r\n0123456789\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(parse(full).unwrap().is_some());
        assert!(matches!(
            parse(b"VA 3\r\nabcXY"),
            Err(ProtoError::BadValueTerminator)
        ));
        assert!(matches!(parse(b"XX\r\n"), Err(ProtoError::UnknownReply(_))));
        assert!(matches!(parse(b"VA\r\n"), Err(ProtoError::BadLine(_))));
        assert!(matches!(parse(b"VA -1\r\n"), Err(ProtoError::BadLine(_))));
        assert!(matches!(parse(b"HD cX\r\n"), Err(ProtoError::BadLine(_))));
        assert!(matches!(
            parse(b"VA 99999999999999999999\r\n"),
            Err(ProtoError::BadLine(_) | ProtoError::ValueTooLong { .. })
        ));
        assert!(matches!(
            parse_with_limit(b"VA 11\r\n", 10),
            Err(ProtoError::ValueTooLong { len: 11, max: 10 })
        ));
        let long = vec![b'H'; MAX_LINE_LEN + 2];
        assert!(matches!(parse(&long), Err(ProtoError::LineTooLong)));
        assert_eq!(parse(&long[..MAX_LINE_LEN]).unwrap(), None);
    }

    #[test]
    fn parses_stats() {
        let reply = b"STAT maxbytes 67108864\r\nSTAT item_size_max 1048576\r\nSTAT x\r\nEND\r\nMN";
        let (stats, n) = parse_stats(reply).unwrap().unwrap();
        assert_eq!(n, reply.len() - 2);
        assert_eq!(stats[1], ("item_size_max".into(), "1048576".into()));
        assert_eq!(stats[2], ("x".into(), String::new()));
        assert_eq!(parse_stats(&reply[..30]).unwrap(), None);
        assert!(parse_stats(b"ERROR\r\n").is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
            let _ = parse_with_limit(&bytes, 16);
            let _ = parse_stats(&bytes);
        }

        #[test]
        fn parse_never_panics_on_reply_like_input(
            code in prop::sample::select(vec!["VA", "HD", "EN", "NS", "EX", "NF", "MN", "SERVER_ERROR", "STAT"]),
            tail in "[ 0-9a-zA-Z\\-\r\n]{0,40}",
            rest in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = format!("{code}{tail}").into_bytes();
            bytes.extend_from_slice(&rest);
            if let Ok(Some((_, used))) = parse(&bytes) {
                prop_assert!(used <= bytes.len());
            }
            let _ = parse_stats(&bytes);
        }

        #[test]
        fn value_round_trips_through_parser(value in proptest::collection::vec(any::<u8>(), 0..300), cas in any::<u64>()) {
            let mut reply = format!("VA {} c{cas}\r\n", value.len()).into_bytes();
            reply.extend_from_slice(&value);
            reply.extend_from_slice(b"\r\n");
            let (r, used) = parse(&reply).unwrap().unwrap();
            prop_assert_eq!(used, reply.len());
            match r {
                Response::Meta { flags, value: Some(v), .. } => {
                    prop_assert_eq!(flags.cas, Some(cas));
                    prop_assert_eq!(v.as_ref(), &value[..]);
                }
                other => prop_assert!(false, "{other:?}"),
            }
        }

        #[test]
        fn replies_parse_the_same_however_they_arrive(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..6),
            cuts in proptest::collection::vec(1usize..16, 0..40),
        ) {
            // A pipelined stream: VA/EN/HD replies, then MN.
            let mut stream = Vec::new();
            for (i, v) in values.iter().enumerate() {
                stream.extend_from_slice(format!("VA {} O{i}\r\n", v.len()).as_bytes());
                stream.extend_from_slice(v);
                stream.extend_from_slice(b"\r\nEN\r\nHD c7\r\n");
            }
            stream.extend_from_slice(b"MN\r\n");
            // Feed it in arbitrary pieces, as a socket would.
            let mut received = Vec::new();
            let mut replies = Vec::new();
            let mut fed = 0;
            let mut cuts = cuts.into_iter();
            while fed < stream.len() {
                let n = cuts.next().unwrap_or(stream.len()).min(stream.len() - fed);
                received.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
                while let Some((reply, used)) = parse(&received).unwrap() {
                    received.drain(..used);
                    replies.push(reply);
                }
            }
            prop_assert!(received.is_empty());
            prop_assert_eq!(replies.len(), values.len() * 3 + 1);
            for (i, v) in values.iter().enumerate() {
                match &replies[i * 3] {
                    Response::Meta { status: Status::Value, flags, value: Some(got) } => {
                        prop_assert_eq!(flags.opaque, Some(i as u32));
                        prop_assert_eq!(got.as_ref(), &v[..]);
                    }
                    other => prop_assert!(false, "{other:?}"),
                }
                prop_assert_eq!(replies[i * 3 + 1].status(), Some(Status::Miss));
                prop_assert_eq!(replies[i * 3 + 2].status(), Some(Status::Ok));
            }
            prop_assert_eq!(replies.last().and_then(Response::status), Some(Status::Noop));
        }

        #[test]
        fn wire_keys_are_valid(key in any::<String>()) {
            let k = WireKey::new(&key);
            prop_assert!(is_plain_key(k.as_str().as_bytes()));
            if k.is_binary() {
                let raw = BASE64.decode(k.as_str()).unwrap();
                prop_assert!(raw == key.as_bytes() || raw.len() == 33);
            } else {
                prop_assert_eq!(k.as_str(), key.as_str());
            }
        }
    }
}
