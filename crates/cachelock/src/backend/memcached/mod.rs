//! The Memcached backend: the meta protocol over a small pooled tokio
//! client, with keys spread over several servers by consistent hashing.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cachelock::BackendError> {
//! use cachelock::backend::memcached::{MemcachedBackend, MemcachedOptions};
//! use std::time::Duration;
//!
//! let one = MemcachedBackend::connect("memcached://127.0.0.1:11211").await?;
//! let many = MemcachedBackend::connect_with(
//!     "memcached://10.0.0.1:11211,10.0.0.2:11211,10.0.0.3:11211",
//!     MemcachedOptions::new().response_timeout(Duration::from_secs(1)),
//! )
//! .await?;
//! # let _ = (one, many); Ok(()) }
//! ```
//!
//! # Why our own client
//!
//! No maintained Rust crate does what the lock needs: the meta protocol
//! (`ms` in add mode, `mg` with CAS and touch, `md` with a CAS guard, `ma`
//! with auto-vivify) together with async pooling over several servers.
//! When this was written, `memcache` was blocking and spoke only the
//! classic ASCII and binary protocols (no meta commands); `memcache-async`
//! drives one stream with the classic protocols; `async-memcached` has a
//! meta-protocol trait but one connection per client, with no pool and no
//! key distribution over servers. The part of the protocol needed here is
//! small, so it is written out in a private `proto` module (pure functions,
//! fuzzed by `fuzz/fuzz_targets/memcached_proto.rs`)
//! plus a small pooled transport.
//!
//! # Operations
//!
//! | operation | commands | round trips |
//! |---|---|---|
//! | `get` / `touch` / `ttl` | `mg v` / `mg T` / `mg t` | 1 |
//! | `set` / `add` / `delete` | `ms` / `ms ME` / `md` | 1 |
//! | `incr` | `ma N0 J<delta> D<delta> v` (auto-vivify) | 1 |
//! | `get_many` / `set_many` | one pipelined write per server, servers in parallel | 1 |
//! | `add_fenced` (lock acquire) | `ms ME c` + `ma` of the fence counter, pipelined | 1 |
//! | `add_reading` (memoize's first lock attempt) | `add_fenced`'s two commands and an `mg v` per key, pipelined; keys on other servers read in parallel | 1 |
//! | `delete_if_version` (lock release) | `md C<cas>` on a connection open since the add | 1 |
//! | `extend_if_version` (lock renewal) | `ms C<cas> T<ttl> c` (same value), likewise | 1 |
//! | `delete_if_eq` (release, no usable CAS) | `mg v c`, compare, `md C<cas>` | 2 |
//! | `extend_if_eq` | `mg v c`, compare, `ms C<cas> T<ttl>` (same value) | 2 |
//! | `set_if` (memoize write-back) | `ms ME` when expecting absence; else `mg v c`, compare, `ms C<cas>` | 1 / 2 |
//!
//! Token operations are atomic thanks to the CAS guard: the item is only
//! deleted or re-stored if it is still the very item that was read. The
//! lock's release and renewal skip the read by sending the CAS its add got
//! back, but only over a connection that was already open when the add was
//! sent (see `delete_if_version` for why; otherwise, or on a CAS mismatch,
//! they take the two-trip form). (The `E` flag that would let the client
//! choose CAS values needs memcached 1.6.27; 1.6.18 refuses it.)
//!
//! Pipelined batches do not use quiet mode: it would save only the `EN` /
//! `HD` reply lines, not a round trip, and unquieted replies arrive one per
//! command in order, so an error reply can be pinned on its exact key.
//!
//! # Why not the meta protocol's own leases
//!
//! `mg <key> N<ttl>` turns a miss into a lease in the same round trip: the
//! first client to miss gets `W` (win: compute it), the others `Z` (a
//! winner exists), and `R<s>` hands out `W` early to one client when the
//! item has less than `s` seconds left. Memoize does not use them: that
//! lease is an empty item under the *value's* key, known to its winner
//! only by the item's CAS, so it carries none of what our lock does:
//!
//! * no token (a release or renewal is by CAS, which any client that read
//!   the item also has) and no holder identity (`cachelock status` names
//!   who holds a lock from its value);
//! * no fencing number, no keep-alive that checks the owner, no
//!   [`LockOptions`](crate::LockOptions) (lease, `max_wait`, Django mode:
//!   djblets' `CacheLock` interoperates through the lock key), and not the
//!   same lock as on the other backends, or for a [`CacheLock`](crate::CacheLock)
//!   taken on the same key;
//! * the empty placeholder is what a plain `get` of the key (a djblets
//!   reader, any client without the flags) reads for the lease's length.
//!
//! [`add_reading`](Backend::add_reading) gets the same single round trip
//! with the lock key: the lock's add and the `mg` of the value are sent in
//! one pipelined write (a value on another server is read in parallel).
//!
//! # TTLs
//!
//! Memcached counts whole seconds with a clock that ticks once a second: an
//! item stored with exptime `T` lives between `T - 1` and `T` seconds (a
//! 1-second item can vanish after a few milliseconds). So that an item
//! never expires **before** its TTL (a lock's lease must not end early),
//! the TTL is rounded up to whole seconds and one second is added: a 1 ms
//! or 1 s TTL is sent as `T2` and lives 1 to 2 s; it never becomes `0`,
//! which would mean "never expires". Items therefore outlive their TTL by
//! up to a second. TTLs over 30 days are sent as an absolute Unix time, as
//! memcached requires. [`ttl`](Backend::ttl) reports the remaining time
//! less that extra second (a lower bound).
//!
//! # Keys and values
//!
//! Keys memcached cannot take as they are (over 250 bytes, spaces, control
//! or non-ASCII characters) are sent base64-encoded with the `b` flag; keys
//! too long even for that are replaced by `0xFF` + their SHA-256 digest
//! (no UTF-8 key has that byte, so they collide with no other key). Values are
//! limited to the smallest `item_size_max` reported by the servers at
//! connect time less 1 KiB of item overhead (1 MiB - 1 KiB by default); a
//! larger value is refused with [`BackendError::ValueTooLarge`], as is one
//! the server itself refuses as too large.
//!
//! # Several servers
//!
//! Keys are spread by ketama-style consistent hashing over the servers as
//! named in the URL; a server that is down makes only its own keys
//! [`Unavailable`](BackendError::Unavailable).

// The meta-protocol codec is not public API. The fuzz target
// (`fuzz/fuzz_targets/memcached_proto.rs`, built by cargo-fuzz, which sets
// `--cfg fuzzing`) reaches it; everything else uses it through the backend.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod proto;
#[cfg(not(fuzzing))]
#[allow(dead_code)]
mod proto;

mod pool;
mod ring;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::join_all;

use self::pool::{Pool, Until};
use self::proto::{ErrorKind, GetFlags, Response, SetFlags, SetMode, Status, WireKey};
use self::ring::Ring;
use super::{
    AddRead, Backend, FENCE_TTL, Grant, Listed, LockAdd, TokenCheck, ValueFormat, Version,
    check_value_size, fence_floor, fence_key,
};
use crate::error::{BackendError, BackendResult};

/// The default connect timeout: 1 second.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The default response timeout: 2 seconds (ample for a 1 MiB value).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The default number of connections per server: 8.
pub const DEFAULT_MAX_CONNECTIONS: usize = 8;
/// Memcached's default item size (`-I`), used when no server says.
pub const DEFAULT_ITEM_SIZE: usize = 1024 * 1024;
/// Bytes of an item reserved for its header, key and CAS.
pub const ITEM_OVERHEAD: usize = 1024;
/// Memcached's default port.
pub const DEFAULT_PORT: u16 = 11211;

/// The longest relative TTL memcached accepts; longer ones are sent as
/// absolute Unix times.
const MAX_RELATIVE_TTL: u64 = 30 * 24 * 60 * 60;
/// The longest value a request that reads none may get back: none.
const NO_VALUE: usize = 0;
/// The longest value `ma` may get back: a decimal `u64` (20 digits).
const COUNTER_VALUE: usize = 20;

/// How often a token operation is retried when the item's CAS changed
/// between the read and the guarded write (a concurrent touch-less update
/// of the same value, in practice never).
const CAS_RETRIES: usize = 3;

/// The client flags pymemcache (and so Django's `PyMemcacheCache`) gives a
/// `str` stored as UTF-8 text.
const PYMEMCACHE_FLAG_TEXT: u32 = 16;

/// Settings for [`MemcachedBackend::connect_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(docsrs, doc(cfg(feature = "memcached")))]
pub struct MemcachedOptions {
    connect_timeout: Duration,
    response_timeout: Duration,
    max_connections: usize,
}

impl Default for MemcachedOptions {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl MemcachedOptions {
    /// The defaults: [`DEFAULT_CONNECT_TIMEOUT`],
    /// [`DEFAULT_RESPONSE_TIMEOUT`], [`DEFAULT_MAX_CONNECTIONS`].
    pub fn new() -> Self {
        Self::default()
    }

    /// How long to wait for a TCP connection; a server that is down
    /// answers [`BackendError::Unavailable`] within this time.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long to wait for a reply (and for a free pooled connection)
    /// before [`BackendError::TimedOut`].
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// The most connections opened to each server (at least 1).
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }
}

/// A [`Backend`] on one or more Memcached servers (meta protocol, memcached
/// 1.6.10 or later). See the [module docs](self).
#[cfg_attr(docsrs, doc(cfg(feature = "memcached")))]
pub struct MemcachedBackend {
    servers: Vec<Pool>,
    ring: Ring,
    max_value_size: usize,
    /// The item size limit (at most 1 GiB): no value read back can be
    /// longer, so no reply may announce one that is.
    item_size: usize,
}

impl std::fmt::Debug for MemcachedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcachedBackend")
            .field("servers", &self.servers)
            .field("max_value_size", &self.max_value_size)
            .finish()
    }
}

/// Splits `memcached://h1:p1,h2:p2` (or a bare `h1:p1,h2:p2`) into
/// `host:port` addresses; a missing port is [`DEFAULT_PORT`]. Each address
/// is checked by the same `host[:port]` parser as
/// [`BackendUrl`](crate::BackendUrl)'s, so both accept the same servers.
fn parse_servers(url: &str) -> BackendResult<Vec<String>> {
    let bad = |why: String| BackendError::InvalidUrl {
        url: crate::backend::url::redact(url),
        reason: why,
    };
    let mut servers = Vec::new();
    for part in url.trim().split(',') {
        let part = part.trim();
        let part = match part.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("memcached") => rest,
            _ => part,
        };
        let part = part.strip_suffix('/').unwrap_or(part);
        if part.is_empty() {
            return Err(bad("empty server address".into()));
        }
        let (host, port) = crate::backend::url::host_port(part, DEFAULT_PORT)
            .map_err(|why| bad(format!("expected host:port addresses: {why}")))?;
        servers.push(format!("{host}:{port}"));
    }
    Ok(servers)
}

/// The second added to every TTL because of memcached's coarse clock (see
/// the module docs).
const CLOCK_SLACK: u64 = 1;

/// A TTL as memcached's exptime: whole seconds rounded up, plus
/// [`CLOCK_SLACK`]; absolute Unix time beyond 30 days.
fn exptime(ttl: Duration) -> i64 {
    let secs = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0))
        .saturating_add(CLOCK_SLACK);
    if secs <= MAX_RELATIVE_TTL {
        return secs as i64;
    }
    // Memcached takes an absolute time here; it reads it as a signed
    // 32-bit number.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    now.saturating_add(secs).min(i32::MAX as u64) as i64
}

impl MemcachedBackend {
    /// Connects with the default [`MemcachedOptions`]. `url` is
    /// `memcached://h1:p1,h2:p2,...` or a bare `h1:p1,h2:p2,...` list.
    ///
    /// Asks every server for its `item_size_max` (in parallel). Servers
    /// that are down are tolerated (their keys are unavailable until they
    /// come back); if none answers, the result is
    /// [`BackendError::Connect`].
    pub async fn connect(url: &str) -> BackendResult<Self> {
        Self::connect_with(url, MemcachedOptions::default()).await
    }

    /// Connects with the given options (see [`connect`](Self::connect)).
    pub async fn connect_with(url: &str, options: MemcachedOptions) -> BackendResult<Self> {
        let addrs = parse_servers(url)?;
        let ring = Ring::new(&addrs);
        let servers: Vec<Pool> = addrs
            .into_iter()
            .map(|addr| {
                Pool::new(
                    addr,
                    options.connect_timeout,
                    options.response_timeout,
                    options.max_connections,
                )
            })
            .collect();
        let answers = join_all(servers.iter().map(|s| s.stats_settings())).await;
        let mut item_size: Option<usize> = None;
        let mut last_error = None;
        for (server, answer) in servers.iter().zip(answers) {
            match answer {
                Ok(stats) => {
                    let size = stats
                        .iter()
                        .find(|(name, _)| name == "item_size_max")
                        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                        .unwrap_or(DEFAULT_ITEM_SIZE);
                    item_size = Some(item_size.map_or(size, |s| s.min(size)));
                }
                Err(e) => {
                    tracing::warn!(addr = server.addr(), error = %e, "memcached server unreachable at connect");
                    last_error = Some(e);
                }
            }
        }
        let item_size = match (item_size, last_error) {
            (Some(size), _) => size,
            (None, Some(e)) => {
                let reason = match e {
                    BackendError::Unavailable { reason, .. } => reason,
                    BackendError::TimedOut { after, .. } => format!("no answer within {after:?}"),
                    other => other.to_string(),
                };
                let servers: Vec<&str> = servers.iter().map(Pool::addr).collect();
                return Err(BackendError::connect(
                    format!("memcached://{}", servers.join(",")),
                    reason,
                ));
            }
            (None, None) => DEFAULT_ITEM_SIZE,
        };
        let item_size = item_size.min(proto::DEFAULT_MAX_VALUE_LEN);
        let max_value_size = item_size.saturating_sub(ITEM_OVERHEAD).max(1);
        Ok(Self {
            servers,
            ring,
            max_value_size,
            item_size,
        })
    }

    /// The servers, as `host:port`, in URL order.
    pub fn servers(&self) -> Vec<&str> {
        self.servers.iter().map(Pool::addr).collect()
    }

    fn server(&self, index: usize, key: &str) -> BackendResult<&Pool> {
        // `ring` was built from `servers`, so the index is always in range.
        self.servers
            .get(index)
            .ok_or_else(|| BackendError::protocol(key, "no memcached server for this key"))
    }

    /// One command, one reply, whose value (if any) is at most
    /// `max_value_len` bytes long.
    async fn one(
        &self,
        key: &str,
        request: &[u8],
        read_only: bool,
        max_value_len: usize,
    ) -> BackendResult<Response> {
        let mut replies = self
            .server(self.ring.server_for(key), key)?
            .request(key, request, Until::Count(1), read_only, max_value_len)
            .await?;
        replies
            .pop()
            .ok_or_else(|| BackendError::protocol(key, "no reply"))
    }

    /// Turns an unexpected reply into an error naming `key`.
    fn unexpected(&self, key: &str, value_len: usize, reply: Response) -> BackendError {
        match reply {
            Response::Error {
                kind: ErrorKind::Server,
                message,
            } if message.contains("too large") => BackendError::ValueTooLarge {
                key: key.to_owned(),
                size: value_len,
                limit: self.max_value_size,
            },
            Response::Error { kind, message } => {
                BackendError::protocol(key, format!("memcached replied {kind:?}: {message}"))
            }
            Response::Meta { status, .. } => {
                BackendError::protocol(key, format!("unexpected memcached reply {status:?}"))
            }
        }
    }

    /// `mg <key> v c f`: the value, its CAS token and its client flags
    /// (0 if the server sent none), if present.
    async fn get_with_cas(
        &self,
        key: &str,
        wire: &WireKey,
    ) -> BackendResult<Option<(Bytes, u64, u32)>> {
        let mut req = Vec::new();
        let flags = GetFlags {
            value: true,
            cas: true,
            client_flags: true,
            ..GetFlags::default()
        };
        proto::encode_get(&mut req, wire, &flags);
        match self.one(key, &req, true, self.item_size).await? {
            Response::Meta {
                status: Status::Miss,
                ..
            } => Ok(None),
            Response::Meta {
                status: Status::Value,
                flags:
                    proto::ReplyFlags {
                        cas: Some(cas),
                        client_flags,
                        ..
                    },
                value: Some(value),
            } => Ok(Some((value, cas, client_flags.unwrap_or(0)))),
            other => Err(self.unexpected(key, 0, other)),
        }
    }

    /// Parses a counter's value.
    fn counter(&self, key: &str, value: &[u8]) -> BackendResult<u64> {
        std::str::from_utf8(value)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| BackendError::protocol(key, "memcached returned a non-numeric counter"))
    }

    /// One `md key C<cas>` over a connection numbered at most the version's
    /// session (see `delete_if_version`): the version still matched
    /// (deleted), the key is gone, or `None`: the CAS differs (someone
    /// else's, or changed), or there is no such connection.
    async fn delete_by_cas(
        &self,
        key: &str,
        version: Version,
    ) -> BackendResult<Option<TokenCheck>> {
        let mut req = Vec::new();
        proto::encode_delete(
            &mut req,
            &WireKey::new(key),
            Some(version.value),
            false,
            None,
        );
        let Some(reply) = self.pinned(key, &req, version.session).await? else {
            return Ok(None);
        };
        match reply {
            Response::Meta {
                status: Status::Ok, ..
            } => Ok(Some(TokenCheck::Matched)),
            Response::Meta {
                status: Status::NotFound,
                ..
            } => Ok(Some(TokenCheck::Missing)),
            Response::Meta {
                status: Status::Exists,
                ..
            } => Ok(None),
            other => Err(self.unexpected(key, 0, other)),
        }
    }

    /// One `ms key T<ttl> C<cas> c` of `value` over a connection numbered
    /// at most the version's session: `Some((check, new version))`, or
    /// `None` if the CAS differs or there is no such connection.
    async fn extend_by_cas(
        &self,
        key: &str,
        value: &[u8],
        version: Version,
        ttl: Duration,
    ) -> BackendResult<Option<(TokenCheck, Option<Version>)>> {
        let mut req = Vec::new();
        let flags = SetFlags {
            ttl: exptime(ttl),
            compare_cas: Some(version.value),
            return_cas: true,
            ..SetFlags::default()
        };
        proto::encode_set(&mut req, &WireKey::new(key), value, &flags);
        let Some(reply) = self.pinned(key, &req, version.session).await? else {
            return Ok(None);
        };
        match reply {
            Response::Meta {
                status: Status::Ok,
                flags,
                ..
            } => Ok(Some((
                TokenCheck::Matched,
                flags.cas.map(|cas| Version {
                    value: cas,
                    session: version.session,
                }),
            ))),
            Response::Meta {
                status: Status::NotFound,
                ..
            } => Ok(Some((TokenCheck::Missing, None))),
            Response::Meta {
                status: Status::Exists,
                ..
            } => Ok(None),
            other => Err(self.unexpected(key, value.len(), other)),
        }
    }

    /// One command over a connection to `key`'s server numbered at most
    /// `session` (see `delete_if_version`); `None`: there is none.
    async fn pinned(
        &self,
        key: &str,
        request: &[u8],
        session: u64,
    ) -> BackendResult<Option<Response>> {
        let replies = self
            .server(self.ring.server_for(key), key)?
            .request_pinned(key, request, Until::Count(1), NO_VALUE, session)
            .await?;
        match replies {
            Some(mut replies) => replies
                .pop()
                .map(Some)
                .ok_or_else(|| BackendError::protocol(key, "no reply")),
            None => Ok(None),
        }
    }

    /// The grant in the first two replies to [`encode_add_fenced`]'s
    /// commands, sent over connection `session`.
    fn grant_from_replies(
        &self,
        key: &str,
        value_len: usize,
        replies: &mut impl Iterator<Item = Response>,
        session: u64,
    ) -> BackendResult<Option<Grant>> {
        let (Some(added), Some(fence)) = (replies.next(), replies.next()) else {
            return Err(BackendError::protocol(key, "missing reply"));
        };
        let version = match added {
            Response::Meta {
                status: Status::Ok,
                flags,
                ..
            } => flags.cas.map(|cas| Version {
                value: cas,
                session,
            }),
            Response::Meta {
                status: Status::NotStored,
                ..
            } => return Ok(None),
            other => return Err(self.unexpected(key, value_len, other)),
        };
        let counter_key = fence_key(key);
        let fence = match fence {
            Response::Meta {
                status: Status::Value,
                value: Some(v),
                ..
            } => self.counter(&counter_key, &v)?,
            other => return Err(self.unexpected(&counter_key, 0, other)),
        };
        Ok(Some(Grant { fence, version }))
    }

    /// The value in the reply to an `mg <key> v`, if it was found.
    fn value_from_reply(&self, key: &str, reply: Response) -> BackendResult<Option<Bytes>> {
        match reply {
            Response::Meta {
                status: Status::Miss,
                ..
            } => Ok(None),
            Response::Meta {
                status: Status::Value,
                value: Some(value),
                ..
            } => Ok(Some(value)),
            other => Err(self.unexpected(key, 0, other)),
        }
    }

    /// Groups item indices by server.
    fn by_server(&self, keys: impl Iterator<Item = (usize, impl AsRef<str>)>) -> Vec<Vec<usize>> {
        let mut groups = vec![Vec::new(); self.servers.len()];
        for (i, key) in keys {
            let server = self.ring.server_for(key.as_ref());
            if let Some(group) = groups.get_mut(server) {
                group.push(i);
            }
        }
        groups
    }
}

/// Appends the lock's add to `req`: `ms key … ME c` (the add, returning its
/// CAS, except in Django's format, see below) and the `ma` of the fence
/// counter, both for the lock key's server.
fn encode_add_fenced(
    req: &mut Vec<u8>,
    key: &str,
    value: &[u8],
    ttl: Duration,
    format: ValueFormat,
) {
    let client_flags = match format {
        ValueFormat::Raw => None,
        ValueFormat::DjangoStr => Some(PYMEMCACHE_FLAG_TEXT),
    };
    let flags = SetFlags {
        mode: SetMode::Add,
        ttl: exptime(ttl),
        client_flags,
        // A Django-format lock is renewed by the flag-keeping
        // read-and-set of `extend_if_eq`, not by CAS (a CAS `ms` would
        // have to resend the flags): it gets no version.
        return_cas: client_flags.is_none(),
        ..SetFlags::default()
    };
    proto::encode_set(req, &WireKey::new(key), value, &flags);
    let counter_key = fence_key(key);
    let floor = fence_floor(SystemTime::now());
    proto::encode_fence(req, &WireKey::new(&counter_key), floor, exptime(FENCE_TTL));
}

#[async_trait]
impl Backend for MemcachedBackend {
    async fn get(&self, key: &str) -> BackendResult<Option<Bytes>> {
        let mut req = Vec::new();
        let flags = GetFlags {
            value: true,
            ..GetFlags::default()
        };
        proto::encode_get(&mut req, &WireKey::new(key), &flags);
        let reply = self.one(key, &req, true, self.item_size).await?;
        self.value_from_reply(key, reply)
    }

    async fn get_many(&self, keys: &[&str]) -> BackendResult<Vec<Option<Bytes>>> {
        let mut out: Vec<Option<Bytes>> = vec![None; keys.len()];
        let groups = self.by_server(keys.iter().enumerate());
        let flags = GetFlags {
            value: true,
            ..GetFlags::default()
        };
        let batches = groups
            .iter()
            .enumerate()
            .filter(|(_, group)| !group.is_empty())
            .map(|(server, group)| {
                let mut req = Vec::new();
                for &i in group {
                    let key = keys.get(i).copied().unwrap_or_default();
                    proto::encode_get(&mut req, &WireKey::new(key), &flags);
                }
                let first = group
                    .first()
                    .and_then(|&i| keys.get(i))
                    .copied()
                    .unwrap_or_default();
                async move {
                    let pool = self.server(server, first)?;
                    let replies = pool
                        .request(first, &req, Until::Count(group.len()), true, self.item_size)
                        .await?;
                    Ok::<_, BackendError>((group, replies))
                }
            });
        for result in join_all(batches).await {
            let (group, replies) = result?;
            for (&i, reply) in group.iter().zip(replies) {
                let key = keys.get(i).copied().unwrap_or_default();
                let value = self.value_from_reply(key, reply)?;
                if let Some(slot) = out.get_mut(i) {
                    *slot = value;
                }
            }
        }
        Ok(out)
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<()> {
        check_value_size(key, value, self.max_value_size())?;
        let mut req = Vec::new();
        let flags = SetFlags {
            ttl: exptime(ttl),
            ..SetFlags::default()
        };
        proto::encode_set(&mut req, &WireKey::new(key), value, &flags);
        match self.one(key, &req, false, NO_VALUE).await? {
            Response::Meta {
                status: Status::Ok, ..
            } => Ok(()),
            other => Err(self.unexpected(key, value.len(), other)),
        }
    }

    async fn set_many(&self, items: &[(&str, &[u8])], ttl: Duration) -> BackendResult<()> {
        for (key, value) in items {
            check_value_size(key, value, self.max_value_size())?;
        }
        let flags = SetFlags {
            ttl: exptime(ttl),
            ..SetFlags::default()
        };
        let groups = self.by_server(items.iter().map(|(k, _)| *k).enumerate());
        let batches = groups
            .iter()
            .enumerate()
            .filter(|(_, group)| !group.is_empty())
            .map(|(server, group)| {
                let mut req = Vec::new();
                for &i in group {
                    if let Some((key, value)) = items.get(i) {
                        proto::encode_set(&mut req, &WireKey::new(key), value, &flags);
                    }
                }
                let first = group
                    .first()
                    .and_then(|&i| items.get(i))
                    .map_or("", |(k, _)| *k);
                async move {
                    let pool = self.server(server, first)?;
                    let replies = pool
                        .request(first, &req, Until::Count(group.len()), false, NO_VALUE)
                        .await?;
                    Ok::<_, BackendError>((group, replies))
                }
            });
        for result in join_all(batches).await {
            let (group, replies) = result?;
            for (&i, reply) in group.iter().zip(replies) {
                let (key, value) = items.get(i).copied().unwrap_or_default();
                if reply.status() != Some(Status::Ok) {
                    return Err(self.unexpected(key, value.len(), reply));
                }
            }
        }
        Ok(())
    }

    /// `ms <key> <len> ME T<ttl>`.
    async fn add(&self, key: &str, value: &[u8], ttl: Duration) -> BackendResult<bool> {
        check_value_size(key, value, self.max_value_size())?;
        let mut req = Vec::new();
        let flags = SetFlags {
            mode: SetMode::Add,
            ttl: exptime(ttl),
            ..SetFlags::default()
        };
        proto::encode_set(&mut req, &WireKey::new(key), value, &flags);
        match self.one(key, &req, false, NO_VALUE).await? {
            Response::Meta {
                status: Status::Ok, ..
            } => Ok(true),
            Response::Meta {
                status: Status::NotStored,
                ..
            } => Ok(false),
            other => Err(self.unexpected(key, value.len(), other)),
        }
    }

    /// `None`: the add (`ms ME`). Otherwise `mg v c`, compare, then
    /// `ms C<cas>`: stored only if the item is still the one read (a CAS
    /// mismatch reads again, a few times).
    async fn set_if(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Duration,
    ) -> BackendResult<bool> {
        let Some(expected) = expected else {
            return self.add(key, value, ttl).await;
        };
        check_value_size(key, value, self.max_value_size())?;
        let wire = WireKey::new(key);
        for _ in 0..CAS_RETRIES {
            let Some((current, cas, _)) = self.get_with_cas(key, &wire).await? else {
                return Ok(false);
            };
            if current.as_ref() != expected {
                return Ok(false);
            }
            let mut req = Vec::new();
            let flags = SetFlags {
                ttl: exptime(ttl),
                compare_cas: Some(cas),
                ..SetFlags::default()
            };
            proto::encode_set(&mut req, &wire, value, &flags);
            match self.one(key, &req, false, NO_VALUE).await? {
                Response::Meta {
                    status: Status::Ok, ..
                } => return Ok(true),
                Response::Meta {
                    status: Status::NotFound,
                    ..
                } => return Ok(false),
                Response::Meta {
                    status: Status::Exists,
                    ..
                } => continue,
                other => return Err(self.unexpected(key, value.len(), other)),
            }
        }
        Ok(false)
    }

    /// Django's `PyMemcacheCache` stores a `str` as its UTF-8 bytes with
    /// client flags 16 (pymemcache's `FLAG_TEXT`), and reads it back as a
    /// `str` only with those flags.
    fn encode_lock_value(&self, text: &str, format: ValueFormat) -> Bytes {
        match format {
            ValueFormat::Raw | ValueFormat::DjangoStr => Bytes::copy_from_slice(text.as_bytes()),
        }
    }

    fn decode_lock_value(&self, value: &[u8], format: ValueFormat) -> Option<String> {
        match format {
            ValueFormat::Raw | ValueFormat::DjangoStr => String::from_utf8(value.to_vec()).ok(),
        }
    }

    /// One round trip: `ms key … ME c` (the add, returning its CAS) and
    /// `ma` of the fence counter, pipelined to the lock key's server. The
    /// counter is also incremented by an add that finds the lock held;
    /// the numbers still rise with each grant. The grant's version is the
    /// add's CAS together with the sequence number of the connection the
    /// add went over (see `delete_if_version`).
    async fn add_fenced(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        format: ValueFormat,
    ) -> BackendResult<Option<Grant>> {
        check_value_size(key, value, self.max_value_size())?;
        let mut req = Vec::new();
        encode_add_fenced(&mut req, key, value, ttl, format);
        let (replies, session) = self
            .server(self.ring.server_for(key), key)?
            .request_tagged(key, &req, Until::Count(2), COUNTER_VALUE)
            .await?;
        self.grant_from_replies(key, value.len(), &mut replies.into_iter(), session)
    }

    /// One round trip to the lock key's server for the add and the `mg`s
    /// of the keys on that server (pipelined behind it, so read after it);
    /// the keys on other servers are read at the same time, as
    /// [`get_many`](Backend::get_many) reads them. See the module docs for
    /// why this is our lock key and not the meta protocol's own lease.
    async fn add_reading(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        add: LockAdd,
        keys: &[&str],
    ) -> BackendResult<AddRead> {
        check_value_size(key, value, self.max_value_size())?;
        let format = match add {
            LockAdd::Fenced(format) => format,
            // No wait queue here: a waiter's add is the plain one.
            LockAdd::Queued => ValueFormat::Raw,
        };
        let server = self.ring.server_for(key);
        let (here, elsewhere): (Vec<usize>, Vec<usize>) = (0..keys.len()).partition(|&i| {
            keys.get(i)
                .is_some_and(|k| self.ring.server_for(k) == server)
        });
        let mut req = Vec::new();
        encode_add_fenced(&mut req, key, value, ttl, format);
        let flags = GetFlags {
            value: true,
            ..GetFlags::default()
        };
        for k in here.iter().filter_map(|&i| keys.get(i)) {
            proto::encode_get(&mut req, &WireKey::new(k), &flags);
        }
        let others: Vec<&str> = elsewhere
            .iter()
            .filter_map(|&i| keys.get(i).copied())
            .collect();
        let (added, others) = futures_util::future::join(
            async {
                self.server(server, key)?
                    .request_tagged(key, &req, Until::Count(2 + here.len()), self.item_size)
                    .await
            },
            async {
                if others.is_empty() {
                    Ok(Vec::new())
                } else {
                    self.get_many(&others).await
                }
            },
        )
        .await;
        let (replies, session) = added?;
        let mut replies = replies.into_iter();
        let grant = self.grant_from_replies(key, value.len(), &mut replies, session)?;
        let values = others.and_then(|others| {
            let mut out = vec![None; keys.len()];
            for (&i, reply) in here.iter().zip(replies.by_ref()) {
                let k = keys.get(i).copied().unwrap_or_default();
                if let Some(slot) = out.get_mut(i) {
                    *slot = self.value_from_reply(k, reply)?;
                }
            }
            for (&i, v) in elsewhere.iter().zip(others) {
                if let Some(slot) = out.get_mut(i) {
                    *slot = v;
                }
            }
            Ok(out)
        });
        Ok(AddRead {
            outcome: grant.into(),
            values,
        })
    }

    /// Read from the lock key's server, where `add_fenced` keeps it.
    async fn fence(&self, key: &str) -> BackendResult<Option<u64>> {
        let counter_key = fence_key(key);
        let mut req = Vec::new();
        let flags = GetFlags {
            value: true,
            ..GetFlags::default()
        };
        proto::encode_get(&mut req, &WireKey::new(&counter_key), &flags);
        let mut replies = self
            .server(self.ring.server_for(key), key)?
            .request(key, &req, Until::Count(1), true, COUNTER_VALUE)
            .await?;
        match replies.pop() {
            Some(Response::Meta {
                status: Status::Value,
                value: Some(v),
                ..
            }) => Ok(self.counter(&counter_key, &v).ok()),
            Some(Response::Meta {
                status: Status::Miss,
                ..
            }) => Ok(None),
            Some(other) => Err(self.unexpected(&counter_key, 0, other)),
            None => Err(BackendError::protocol(key, "no reply")),
        }
    }

    /// One `md key C<cas>` over a connection open since the add (`NF`:
    /// the key is gone); if there is none, or the CAS differs (`EX`), the
    /// read-compare-delete of [`delete_if_eq`](Backend::delete_if_eq).
    ///
    /// # Why the CAS is only sent over an old connection
    ///
    /// Memcached 1.6.18 cannot be told which CAS to give an item (no `E`
    /// flag), and a restarted server counts CAS values from 1 again: after
    /// a restart, another holder's fresh lock can carry the very CAS our
    /// add got from the old process, and an `md key C<cas>` that reached
    /// the new process would delete their lock. So the CAS is sent only
    /// where it means what it meant at the add: to the server *process*
    /// that executed the add, which is where the CAS is unique.
    ///
    /// Every pooled connection is numbered once it is established (rising
    /// per server, see `pool`), and the add reports the number `s` of the
    /// connection it went over. The CAS is then sent only over a
    /// connection numbered `s` or lower, to the same peer address (no
    /// change of peer between the two numbers), that is still the same
    /// TCP connection (pooled connections are never reconnected in place).
    /// Such a connection was established (accepted by the process that
    /// listened on that address then, `P'`) before the add was sent over
    /// connection `s` and executed by process `P`. One process listens on
    /// a port at a time, so if `P'` is not `P`, `P'` had exited by the
    /// time `P` executed the add, and its exit closed every connection it
    /// had accepted, ours included: a command written on it now reaches no
    /// process (the kernel answers with a reset; we read EOF or an error,
    /// and fall back). Hence the `md` either reaches `P`, where our CAS
    /// names our item only, or no server at all. A renewal's new CAS
    /// (`ms … c` over such a connection) is `P`'s too, so it keeps `s`.
    ///
    /// What this assumes: the client talks to memcached itself (not
    /// through a proxy such as mcrouter or twemproxy, whose connections
    /// survive a memcached restart behind it); one memcached process per
    /// address (no `SO_REUSEPORT` pair). When no old connection is idle
    /// (it was closed, or all are busy), the two-trip path is taken: it
    /// compares the whole stored value, token included.
    async fn delete_if_version(
        &self,
        key: &str,
        expected: &[u8],
        version: Option<Version>,
        hold: Duration,
    ) -> BackendResult<TokenCheck> {
        if let Some(version) = version
            && let Some(check) = self.delete_by_cas(key, version).await?
        {
            return Ok(check);
        }
        self.delete_if_eq(key, expected, hold).await
    }

    /// One `ms key T<ttl> C<cas> c` (the same value) over a connection open
    /// since the add, as in `delete_if_version`, returning the new CAS; if
    /// there is none, or the CAS differs, the read of
    /// [`extend_if_eq`](Backend::extend_if_eq) (and no version after).
    async fn extend_if_version(
        &self,
        key: &str,
        expected: &[u8],
        version: Option<Version>,
        ttl: Duration,
    ) -> BackendResult<(TokenCheck, Option<Version>)> {
        if let Some(version) = version
            && let Some(done) = self.extend_by_cas(key, expected, version, ttl).await?
        {
            return Ok(done);
        }
        Ok((self.extend_if_eq(key, expected, ttl).await?, None))
    }

    /// Memcached cannot list its keys: the protocol has no way to (the
    /// `lru_crawler metadump` of some versions is a debugging aid that
    /// walks the whole cache, and it is often disabled).
    async fn list(&self, prefix: &str, limit: usize) -> BackendResult<Vec<Listed>> {
        let _ = (prefix, limit);
        Err(BackendError::Unsupported {
            backend: "memcached".to_owned(),
            operation: "list its keys (the protocol has no way to enumerate them)".to_owned(),
        })
    }

    async fn touch(&self, key: &str, ttl: Duration) -> BackendResult<bool> {
        let mut req = Vec::new();
        let flags = GetFlags {
            touch: Some(exptime(ttl)),
            ..GetFlags::default()
        };
        proto::encode_get(&mut req, &WireKey::new(key), &flags);
        match self.one(key, &req, false, NO_VALUE).await? {
            Response::Meta {
                status: Status::Ok, ..
            } => Ok(true),
            Response::Meta {
                status: Status::Miss,
                ..
            } => Ok(false),
            other => Err(self.unexpected(key, 0, other)),
        }
    }

    async fn delete(&self, key: &str) -> BackendResult<bool> {
        let mut req = Vec::new();
        proto::encode_delete(&mut req, &WireKey::new(key), None, false, None);
        match self.one(key, &req, false, NO_VALUE).await? {
            Response::Meta {
                status: Status::Ok, ..
            } => Ok(true),
            Response::Meta {
                status: Status::NotFound,
                ..
            } => Ok(false),
            other => Err(self.unexpected(key, 0, other)),
        }
    }

    async fn incr(&self, key: &str, delta: u64) -> BackendResult<u64> {
        let mut req = Vec::new();
        // On a miss the item is created holding `delta` with no expiry.
        proto::encode_incr(&mut req, &WireKey::new(key), delta, Some((0, delta)));
        // Two clients vivifying at once: the loser gets NS; the item exists
        // now, so a second try increments it.
        for _ in 0..2 {
            match self.one(key, &req, false, COUNTER_VALUE).await? {
                Response::Meta {
                    status: Status::Value,
                    value: Some(value),
                    ..
                } => {
                    return std::str::from_utf8(&value)
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .ok_or_else(|| {
                            BackendError::protocol(key, "memcached returned a non-numeric counter")
                        });
                }
                Response::Meta {
                    status: Status::NotStored,
                    ..
                } => continue,
                Response::Error {
                    kind: ErrorKind::Client,
                    message,
                } if message.contains("non-numeric") => {
                    return Err(BackendError::protocol(
                        key,
                        "cannot increment a value that is not a decimal number",
                    ));
                }
                other => return Err(self.unexpected(key, 0, other)),
            }
        }
        Err(BackendError::protocol(key, "counter could not be created"))
    }

    async fn delete_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        _hold: Duration,
    ) -> BackendResult<TokenCheck> {
        let wire = WireKey::new(key);
        for _ in 0..CAS_RETRIES {
            let Some((value, cas, _)) = self.get_with_cas(key, &wire).await? else {
                return Ok(TokenCheck::Missing);
            };
            if value.as_ref() != expected {
                return Ok(TokenCheck::Mismatch);
            }
            let mut req = Vec::new();
            proto::encode_delete(&mut req, &wire, Some(cas), false, None);
            match self.one(key, &req, false, NO_VALUE).await? {
                Response::Meta {
                    status: Status::Ok, ..
                } => return Ok(TokenCheck::Matched),
                Response::Meta {
                    status: Status::NotFound,
                    ..
                } => return Ok(TokenCheck::Missing),
                // Changed since we read it: look again.
                Response::Meta {
                    status: Status::Exists,
                    ..
                } => continue,
                other => return Err(self.unexpected(key, 0, other)),
            }
        }
        Ok(TokenCheck::Mismatch)
    }

    async fn extend_if_eq(
        &self,
        key: &str,
        expected: &[u8],
        ttl: Duration,
    ) -> BackendResult<TokenCheck> {
        let wire = WireKey::new(key);
        for _ in 0..CAS_RETRIES {
            let Some((value, cas, client_flags)) = self.get_with_cas(key, &wire).await? else {
                return Ok(TokenCheck::Missing);
            };
            if value.as_ref() != expected {
                return Ok(TokenCheck::Mismatch);
            }
            let mut req = Vec::new();
            // The value is stored again: keep its client flags (a Django-
            // compatible lock's 16), or Django would read it back as bytes.
            let flags = SetFlags {
                ttl: exptime(ttl),
                compare_cas: Some(cas),
                client_flags: (client_flags != 0).then_some(client_flags),
                ..SetFlags::default()
            };
            proto::encode_set(&mut req, &wire, expected, &flags);
            match self.one(key, &req, false, NO_VALUE).await? {
                Response::Meta {
                    status: Status::Ok, ..
                } => return Ok(TokenCheck::Matched),
                Response::Meta {
                    status: Status::NotFound,
                    ..
                } => return Ok(TokenCheck::Missing),
                Response::Meta {
                    status: Status::Exists,
                    ..
                } => continue,
                other => return Err(self.unexpected(key, expected.len(), other)),
            }
        }
        Ok(TokenCheck::Mismatch)
    }

    /// `mg <key> t`, less the second added when it was stored. An
    /// item with no expiry reads as `None`.
    async fn ttl(&self, key: &str) -> BackendResult<Option<Duration>> {
        let mut req = Vec::new();
        let flags = GetFlags {
            ttl: true,
            ..GetFlags::default()
        };
        proto::encode_get(&mut req, &WireKey::new(key), &flags);
        match self.one(key, &req, true, NO_VALUE).await? {
            Response::Meta {
                status: Status::Miss,
                ..
            } => Ok(None),
            Response::Meta {
                status: Status::Ok,
                flags,
                ..
            } => Ok(flags
                .ttl
                .and_then(|t| u64::try_from(t).ok())
                .map(|t| Duration::from_secs(t.saturating_sub(CLOCK_SLACK)))),
            other => Err(self.unexpected(key, 0, other)),
        }
    }

    fn atomic_token_ops(&self) -> bool {
        true
    }

    fn max_value_size(&self) -> usize {
        self.max_value_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse_servers("memcached://127.0.0.1:21211,127.0.0.1:21212").unwrap(),
            ["127.0.0.1:21211", "127.0.0.1:21212"]
        );
        assert_eq!(
            parse_servers("a:1, MEMCACHED://b:2 ,c").unwrap(),
            ["a:1", "b:2", "c:11211"]
        );
        assert_eq!(
            parse_servers("[::1]:5,[::1]").unwrap(),
            ["[::1]:5", "[::1]:11211"]
        );
        for bad in [
            "",
            "memcached://",
            "a:1,,b:2",
            "a:notaport",
            "a:99999",
            "redis://x:1",
            "a:1/db",
            "a:0",
            "u:p@a:1",
        ] {
            assert!(parse_servers(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ttls_round_up_and_go_absolute() {
        assert_eq!(exptime(Duration::ZERO), 1, "never 0");
        assert_eq!(exptime(Duration::from_millis(1)), 2);
        assert_eq!(exptime(Duration::from_secs(1)), 2);
        assert_eq!(exptime(Duration::from_millis(1500)), 3);
        assert_eq!(exptime(Duration::from_secs(60)), 61);
        assert_eq!(
            exptime(Duration::from_secs(MAX_RELATIVE_TTL - 1)),
            MAX_RELATIVE_TTL as i64
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let abs = exptime(Duration::from_secs(MAX_RELATIVE_TTL));
        assert!(
            (abs - now - MAX_RELATIVE_TTL as i64 - 1).abs() <= 2,
            "{abs}"
        );
        assert_eq!(exptime(Duration::from_secs(u64::MAX)), i32::MAX as i64);
    }
}
