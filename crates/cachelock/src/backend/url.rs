//! Choosing a backend by URL.
//!
//! [`connect`] turns a URL into a connected [`SharedBackend`]. The URL is
//! first checked against a whitelist of schemes and parsed into a typed
//! [`BackendUrl`] (no I/O, so a malformed URL is refused before anything is
//! tried), then the backend is opened or connected.
//!
//! | URL | Backend |
//! |-----|---------|
//! | `memory://` | [`MemoryBackend`](crate::MemoryBackend), in this process only |
//! | `sqlite:///abs/path.sqlite3` | the embedded SQLite file (feature `sqlite`) |
//! | `redis://[user:pass@]host[:port][/db]`, `rediss://…` (TLS) | one Redis server (feature `redis`) |
//! | `redis+unix:///path/to/socket` | one Redis server on a Unix socket (feature `redis`) |
//! | `redis+cluster://[user:pass@]h1:p1,h2:p2`, `rediss+cluster://…` | a Redis Cluster, from seed nodes (feature `redis`) |
//! | `redis+sentinel://[user:pass@]h1:p1,h2:p2/service[/db]` | the master of `service`, found through Redis Sentinels (feature `redis`; no TLS) |
//! | `memcached://h1:p1,h2:p2` | one or more Memcached servers (feature `memcached`) |
//!
//! Schemes are case-insensitive (`REDIS://` is `redis://`). The SQLite path
//! must be absolute and is taken literally (no `~` expansion and no
//! percent-decoding): a relative path would name a different file in every
//! working directory, so jobs started from different directories would not
//! exclude each other. Redis URLs (each seed node of a Cluster URL too) are
//! checked by the Redis client's own parser when they are parsed here, so a
//! URL accepted here is not refused when connecting. Passwords (in the user info, or a `pass=` / `password=`
//! query parameter) are replaced with `***` by [`redact`], the one redaction
//! used by `Display`, `Debug` and every error.
//!
//! A scheme whose feature this build leaves out is refused by
//! [`BackendUrl::connect`] with an error that names the feature.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachelock::BackendError> {
//! use cachelock::BackendUrl;
//!
//! assert_eq!(BackendUrl::parse("memory://")?, BackendUrl::Memory);
//! assert!(BackendUrl::parse("mysql://db").is_err());
//! let cache = cachelock::connect("memory://").await?;
//! # let _ = cache; Ok(()) }
//! ```

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use super::SharedBackend;
use crate::error::BackendError;

/// The schemes [`BackendUrl::parse`] knows, as shown in error messages.
pub const SCHEMES: &str = "memory://, sqlite://PATH, redis://, rediss://, redis+unix://, \
                           redis+cluster://, rediss+cluster://, redis+sentinel://, memcached://";

/// A parsed, validated backend URL: which backend, and where.
///
/// `Debug` and `Display` show it with any password replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendUrl {
    /// `memory://`: a fresh in-process cache.
    Memory,
    /// `sqlite://PATH`: the embedded SQLite cache file.
    Sqlite(PathBuf),
    /// `redis://`, `rediss://` or `redis+unix://`: one Redis server. Holds
    /// the URL as given (scheme in lower case), for the Redis client.
    Redis(String),
    /// `redis+cluster://h1:p1,h2:p2`: a Redis Cluster. Holds one
    /// `redis://` (or `rediss://`) URL per seed node.
    RedisCluster(Vec<String>),
    /// `redis+sentinel://h1:p1,h2:p2/service`: the master of a service
    /// watched by Redis Sentinel.
    RedisSentinel(SentinelUrl),
    /// `memcached://h1:p1,h2:p2`: Memcached servers. Holds the URL with
    /// each server as `host:port` (port 11211 when left out).
    Memcached(String),
}

/// A parsed `redis+sentinel://[user:pass@]h1:p1,h2:p2/service[/db]` URL:
/// the Sentinels to ask (port 26379 when left out), the service (master)
/// name, and the credentials and database used on the master (the
/// Sentinels themselves are asked without credentials).
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    sentinels: Vec<(String, u16)>,
    service: String,
    /// `redis://[user:pass@]SENTINEL1[/db]`: the master's settings, with a
    /// Sentinel's address standing in for the master's until it is known.
    master: String,
}

impl SentinelUrl {
    /// The default port of a Sentinel.
    pub const DEFAULT_PORT: u16 = 26379;

    /// The Sentinels, as `(host, port)`.
    pub fn sentinels(&self) -> &[(String, u16)] {
        &self.sentinels
    }

    /// The service (master) name the Sentinels know.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// A `redis://` URL with the master's credentials and database (its
    /// host is a Sentinel's, replaced by the master's when connecting).
    pub fn master_settings_url(&self) -> &str {
        &self.master
    }

    fn parse(url: &str, rest: &str) -> Result<Self, BackendError> {
        let bad = |reason: String| BackendError::InvalidUrl {
            url: redact(url),
            reason,
        };
        let (userinfo, hosts, tail) = split_authority(rest);
        if hosts.is_empty() {
            return Err(bad(
                "redis+sentinel:// needs at least one Sentinel host:port".into(),
            ));
        }
        let mut sentinels = Vec::new();
        for node in hosts.split(',') {
            if node.trim().is_empty() {
                return Err(bad(
                    "empty host between commas (check for a stray comma)".into()
                ));
            }
            sentinels.push(host_port(node, Self::DEFAULT_PORT).map_err(bad)?);
        }
        if tail.contains(['?', '#']) {
            return Err(bad("redis+sentinel:// takes no query or fragment".into()));
        }
        let mut path = tail.trim_start_matches('/').split('/');
        let service = path.next().unwrap_or_default();
        if service.is_empty() {
            return Err(bad(
                "redis+sentinel:// needs the service (master) name, as in \
                 redis+sentinel://h1:26379,h2:26379/mymaster"
                    .into(),
            ));
        }
        if !service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(bad(format!(
                "the service name {service:?} may hold only letters, digits, '-', '_' and '.'"
            )));
        }
        let db = match (path.next(), path.next()) {
            (None | Some(""), None) => String::new(),
            (Some(db), None) => format!("/{db}"),
            _ => {
                return Err(bad(
                    "expected /service or /service/db after the hosts".into()
                ));
            }
        };
        let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let (host, port) = &sentinels[0];
        let master = format!("redis://{auth}{host}:{port}{db}");
        #[cfg(feature = "redis")]
        if let Err(e) = crate::backend::redis::check_url(&master) {
            return Err(match e {
                BackendError::InvalidUrl { reason, .. } => bad(reason),
                other => other,
            });
        }
        Ok(Self {
            sentinels,
            service: service.to_owned(),
            master,
        })
    }
}

impl fmt::Display for SentinelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect();
        let db = self
            .master
            .split_once("://")
            .map(|(_, r)| split_authority(r).2)
            .unwrap_or_default();
        write!(
            f,
            "redis+sentinel://{}/{}{db}",
            hosts.join(","),
            self.service
        )
    }
}

/// Shows the URL without its password.
impl fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SentinelUrl({self})")
    }
}

impl BackendUrl {
    /// Parses and checks `url`, without connecting.
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidUrl`], naming the URL (password redacted) and
    /// the problem, if the scheme is unknown or the address is malformed.
    pub fn parse(url: &str) -> Result<Self, BackendError> {
        let bad = |reason: String| BackendError::InvalidUrl {
            url: redact(url),
            reason,
        };
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad(format!("no scheme; expected one of {SCHEMES}")));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "memory" => {
                if rest.is_empty() || rest == "/" {
                    Ok(Self::Memory)
                } else {
                    Err(bad("memory:// takes no address".into()))
                }
            }
            "sqlite" => {
                if rest.is_empty() {
                    Err(bad(
                        "sqlite:// needs a file path, as in sqlite:///var/tmp/locks.sqlite3".into(),
                    ))
                } else if rest.ends_with('/') {
                    Err(bad(format!("the SQLite path {rest:?} names a directory")))
                } else if !rest.starts_with('/') {
                    Err(bad(format!(
                        "the SQLite path {rest:?} is relative, so it would name another file in \
                         every working directory; give an absolute path, as in sqlite:///{rest}"
                    )))
                } else {
                    Ok(Self::Sqlite(PathBuf::from(rest)))
                }
            }
            s @ ("redis" | "rediss") => {
                let (_, hostport, _) = split_authority(rest);
                if hostport.contains(',') {
                    return Err(bad(format!(
                        "{s}:// takes one server; use redis+cluster:// for several"
                    )));
                }
                host_port(hostport, 6379).map_err(bad)?;
                let normalized = format!("{s}://{rest}");
                #[cfg(feature = "redis")]
                crate::backend::redis::check_url(&normalized)?;
                Ok(Self::Redis(normalized))
            }
            s @ ("redis+unix" | "unix") => {
                let path = rest.split(['?', '#']).next().unwrap_or_default();
                if path.is_empty() || !path.starts_with('/') {
                    Err(bad(
                        "redis+unix:// needs an absolute socket path, as in redis+unix:///run/redis.sock"
                            .into(),
                    ))
                } else {
                    let normalized = format!("{s}://{rest}");
                    #[cfg(feature = "redis")]
                    crate::backend::redis::check_url(&normalized)?;
                    Ok(Self::Redis(normalized))
                }
            }
            s @ ("redis+cluster" | "rediss+cluster") => {
                let node_scheme = s.trim_end_matches("+cluster");
                let (userinfo, hosts, tail) = split_authority(rest);
                if hosts.is_empty() {
                    return Err(bad(format!("{s}:// needs at least one host:port")));
                }
                let mut nodes = Vec::new();
                for node in hosts.split(',') {
                    if node.trim().is_empty() {
                        return Err(bad(
                            "empty host between commas (check for a stray comma)".into()
                        ));
                    }
                    let (host, port) = host_port(node, 6379).map_err(bad)?;
                    let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
                    let node = format!("{node_scheme}://{auth}{host}:{port}{tail}");
                    // The same check as a single-server URL, so that a
                    // Cluster URL accepted here is not refused when
                    // connecting (a database in the path, a bad query).
                    #[cfg(feature = "redis")]
                    if let Err(e) = crate::backend::redis::check_url(&node) {
                        return Err(match e {
                            BackendError::InvalidUrl { reason, .. } => bad(reason),
                            other => other,
                        });
                    }
                    nodes.push(node);
                }
                Ok(Self::RedisCluster(nodes))
            }
            "redis+sentinel" => Ok(Self::RedisSentinel(SentinelUrl::parse(url, rest)?)),
            "memcached" | "memcache" => {
                let (userinfo, hosts, tail) = split_authority(rest);
                if userinfo.is_some() {
                    return Err(bad("memcached:// does not take a user or password".into()));
                }
                if !tail.is_empty() && tail != "/" {
                    return Err(bad(format!(
                        "memcached:// takes only host:port pairs, not {tail:?}"
                    )));
                }
                if hosts.is_empty() {
                    return Err(bad("memcached:// needs at least one host:port".into()));
                }
                let mut servers = Vec::new();
                for node in hosts.split(',') {
                    if node.trim().is_empty() {
                        return Err(bad(
                            "empty host between commas (check for a stray comma)".into()
                        ));
                    }
                    let (host, port) = host_port(node, 11211).map_err(bad)?;
                    servers.push(format!("{host}:{port}"));
                }
                Ok(Self::Memcached(format!(
                    "memcached://{}",
                    servers.join(",")
                )))
            }
            "" => Err(bad(format!("empty scheme; expected one of {SCHEMES}"))),
            other => Err(bad(format!(
                "unknown scheme {other:?}; expected one of {SCHEMES}"
            ))),
        }
    }

    /// The backend's name, as used in messages and benchmark output:
    /// `memory`, `sqlite`, `redis`, `redis-cluster`, `redis-sentinel` or
    /// `memcached`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite(_) => "sqlite",
            Self::Redis(_) => "redis",
            Self::RedisCluster(_) => "redis-cluster",
            Self::RedisSentinel(_) => "redis-sentinel",
            Self::Memcached(_) => "memcached",
        }
    }

    /// Opens or connects the backend, with the default [`ConnectOptions`].
    ///
    /// # Errors
    ///
    /// [`BackendError::Connect`] if the server cannot be reached or the file
    /// cannot be opened; [`BackendError::InvalidUrl`], naming the Cargo
    /// feature, if this build leaves the backend out.
    pub async fn connect(&self) -> Result<SharedBackend, BackendError> {
        self.connect_with(&ConnectOptions::default()).await
    }

    /// Opens or connects the backend with the given options.
    ///
    /// # Errors
    ///
    /// As for [`connect`](Self::connect).
    pub async fn connect_with(
        &self,
        options: &ConnectOptions,
    ) -> Result<SharedBackend, BackendError> {
        let _ = options;
        match self {
            Self::Memory => Ok(Arc::new(crate::MemoryBackend::new())),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(path) => Ok(Arc::new(
                crate::SqliteBackend::open_with_busy_timeout(path, options.sqlite_busy_timeout)
                    .await?,
            )),
            #[cfg(not(feature = "sqlite"))]
            Self::Sqlite(_) => Err(self.unsupported("sqlite")),
            #[cfg(feature = "redis")]
            Self::Redis(url) => Ok(Arc::new(crate::RedisBackend::connect(url).await?)),
            #[cfg(feature = "redis")]
            Self::RedisCluster(nodes) => {
                let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
                Ok(Arc::new(
                    crate::RedisBackend::connect_cluster(&nodes).await?,
                ))
            }
            #[cfg(feature = "redis")]
            Self::RedisSentinel(target) => Ok(Arc::new(
                crate::RedisBackend::connect_sentinel(target).await?,
            )),
            #[cfg(not(feature = "redis"))]
            Self::Redis(_) | Self::RedisCluster(_) | Self::RedisSentinel(_) => {
                Err(self.unsupported("redis"))
            }
            #[cfg(feature = "memcached")]
            Self::Memcached(url) => Ok(Arc::new(crate::MemcachedBackend::connect(url).await?)),
            #[cfg(not(feature = "memcached"))]
            Self::Memcached(_) => Err(self.unsupported("memcached")),
        }
    }

    #[allow(dead_code)]
    fn unsupported(&self, feature: &str) -> BackendError {
        BackendError::InvalidUrl {
            url: self.to_string(),
            reason: format!(
                "this build has no {feature} backend; enable the cachelock crate's \
                 `{feature}` Cargo feature"
            ),
        }
    }
}

impl FromStr for BackendUrl {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Settings for [`BackendUrl::connect_with`] that a URL does not carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    sqlite_busy_timeout: std::time::Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            sqlite_busy_timeout: DEFAULT_SQLITE_BUSY_TIMEOUT,
        }
    }
}

/// How long a SQLite operation waits for another process's write lock by
/// default: 10 s.
pub const DEFAULT_SQLITE_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl ConnectOptions {
    /// The default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long each SQLite operation waits for another process's write
    /// lock before it fails with [`BackendError::TimedOut`]. Defaults to
    /// 10 s. A caller that must not wait (a no-wait acquire) sets it low,
    /// say 100 ms: one transaction holds the lock for microseconds, so only
    /// a stuck or very busy writer is waited for that long. At most one day
    /// (longer is cut to it). Other backends ignore it.
    #[must_use]
    pub fn sqlite_busy_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.sqlite_busy_timeout = timeout;
        self
    }

    /// The SQLite busy timeout.
    pub fn sqlite_busy_timeout_duration(&self) -> std::time::Duration {
        self.sqlite_busy_timeout
    }
}

/// Shows the URL with any password replaced by `***`.
impl fmt::Debug for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("Memory"),
            Self::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            Self::Redis(u) => f.debug_tuple("Redis").field(&redact(u)).finish(),
            Self::RedisCluster(nodes) => f
                .debug_tuple("RedisCluster")
                .field(&nodes.iter().map(|n| redact(n)).collect::<Vec<_>>())
                .finish(),
            Self::RedisSentinel(t) => fmt::Debug::fmt(t, f),
            Self::Memcached(u) => f.debug_tuple("Memcached").field(&redact(u)).finish(),
        }
    }
}

/// Shows the URL with any password replaced by `***`.
impl fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("memory://"),
            Self::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            Self::Redis(u) | Self::Memcached(u) => f.write_str(&redact(u)),
            Self::RedisSentinel(t) => t.fmt(f),
            Self::RedisCluster(nodes) => {
                let hosts: Vec<String> = nodes
                    .iter()
                    .map(|n| {
                        let rest = n.split_once("://").map_or(n.as_str(), |(_, r)| r);
                        split_authority(rest).1.to_owned()
                    })
                    .collect();
                let scheme = if nodes.first().is_some_and(|n| n.starts_with("rediss")) {
                    "rediss+cluster"
                } else {
                    "redis+cluster"
                };
                write!(f, "{scheme}://{}", hosts.join(","))
            }
        }
    }
}

/// Connects to the backend named by `url` (see the [module docs](self) for
/// the schemes).
///
/// # Errors
///
/// [`BackendError::InvalidUrl`] for a malformed URL, an unknown scheme or a
/// backend left out of this build; [`BackendError::Unavailable`] or
/// [`BackendError::TimedOut`] when the server or file cannot be reached.
pub async fn connect(url: &str) -> Result<SharedBackend, BackendError> {
    BackendUrl::parse(url)?.connect().await
}

/// Splits `rest` (what follows `scheme://`) into user info, the host list,
/// and the path/query tail (starting with `/`, `?` or `#`, or empty).
fn split_authority(rest: &str) -> (Option<&str>, &str, &str) {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((user, hosts)) => (Some(user), hosts, tail),
        None => (None, authority, tail),
    }
}

/// Parses `host[:port]` (IPv6 in brackets), with `default` as the port.
/// The one host:port parser: [`BackendUrl::parse`] and the Memcached
/// backend's server list use it.
pub(crate) fn host_port(node: &str, default: u16) -> Result<(String, u16), String> {
    let node = node.trim();
    if node.is_empty() {
        return Err("missing host".into());
    }
    let (host, port) = if let Some(inner) = node.strip_prefix('[') {
        let Some((h, after)) = inner.split_once(']') else {
            return Err(format!("unclosed '[' in host {node:?}"));
        };
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("unexpected {p:?} after IPv6 address {h:?}"))?,
            ),
        };
        (format!("[{h}]"), port)
    } else {
        match node.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (node.to_owned(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(format!("missing host in {node:?}"));
    }
    if let Some(c) = host
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '/' | '@' | ',' | '?' | '#'))
    {
        return Err(format!("invalid character {c:?} in host {host:?}"));
    }
    let port = match port {
        None => default,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(format!("invalid port {p:?} in {node:?} (expected 1-65535)"));
            }
            Ok(p) => p,
        },
    };
    Ok((host, port))
}

/// `url` with its password replaced by `***`, for messages: the password
/// in the user info (`redis://user:***@host`) and any `pass=` or
/// `password=` query parameter (`redis+unix:///s?pass=***`). The one
/// redaction used by [`BackendUrl`]'s `Display` and `Debug` and by every
/// backend's errors. Works on any text, also one that does not parse.
pub fn redact(url: &str) -> String {
    let url = redact_userinfo(url);
    let Some(q) = url.find('?') else {
        return url;
    };
    let (head, query) = url.split_at(q);
    let mut out = head.to_owned();
    for (i, part) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let bare = part.trim_start_matches('?').to_ascii_lowercase();
        if bare.starts_with("pass=") || bare.starts_with("password=") {
            let (name, _) = part.split_once('=').unwrap_or((part, ""));
            out.push_str(name);
            out.push_str("=***");
        } else {
            out.push_str(part);
        }
    }
    out
}

fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (userinfo, _, _) = split_authority(rest);
    match userinfo.and_then(|u| u.split_once(':')) {
        Some((user, _)) => {
            let at = rest
                .find(['/', '?', '#'])
                .map_or(rest, |end| rest.get(..end).unwrap_or(rest))
                .rfind('@')
                .map_or(0, |i| i + 1);
            format!(
                "{scheme}://{user}:***@{}",
                rest.get(at..).unwrap_or_default()
            )
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_urls() {
        let cases: &[(&str, BackendUrl)] = &[
            ("memory://", BackendUrl::Memory),
            ("MEMORY://", BackendUrl::Memory),
            (
                "sqlite:///var/tmp/x.sqlite3",
                BackendUrl::Sqlite("/var/tmp/x.sqlite3".into()),
            ),
            (
                "redis://127.0.0.1:6379",
                BackendUrl::Redis("redis://127.0.0.1:6379".into()),
            ),
            (
                "redis://:pw@localhost/2",
                BackendUrl::Redis("redis://:pw@localhost/2".into()),
            ),
            (
                "rediss://cache.example.com",
                BackendUrl::Redis("rediss://cache.example.com".into()),
            ),
            (
                "redis://[::1]:7000",
                BackendUrl::Redis("redis://[::1]:7000".into()),
            ),
            (
                "redis+unix:///run/redis.sock",
                BackendUrl::Redis("redis+unix:///run/redis.sock".into()),
            ),
            (
                "redis+cluster://h1:7001,h2:7002,h3",
                BackendUrl::RedisCluster(vec![
                    "redis://h1:7001".into(),
                    "redis://h2:7002".into(),
                    "redis://h3:6379".into(),
                ]),
            ),
            (
                "rediss+cluster://u:p@h1:7001,h2:7002",
                BackendUrl::RedisCluster(vec![
                    "rediss://u:p@h1:7001".into(),
                    "rediss://u:p@h2:7002".into(),
                ]),
            ),
            (
                "memcached://127.0.0.1:21211,127.0.0.1:21212",
                BackendUrl::Memcached("memcached://127.0.0.1:21211,127.0.0.1:21212".into()),
            ),
            (
                "memcached://cachehost",
                BackendUrl::Memcached("memcached://cachehost:11211".into()),
            ),
        ];
        for (url, want) in cases {
            assert_eq!(&BackendUrl::parse(url).unwrap(), want, "{url}");
        }
    }

    #[test]
    fn rejected_urls() {
        let cases: &[(&str, &str)] = &[
            ("", "no scheme"),
            ("localhost:6379", "no scheme"),
            ("://x", "empty scheme"),
            ("mysql://db", "unknown scheme \"mysql\""),
            ("memory://x", "takes no address"),
            ("sqlite://", "needs a file path"),
            ("sqlite:///tmp/", "names a directory"),
            ("sqlite://rel/x.db", "is relative"),
            ("sqlite://relative.db", "give an absolute path"),
            ("redis://", "missing host"),
            ("redis://:6379", "missing host"),
            ("redis://host:0", "invalid port \"0\""),
            ("redis://host:99999", "invalid port \"99999\""),
            ("redis://host:abc", "invalid port \"abc\""),
            ("redis://h1:1,h2:2", "use redis+cluster://"),
            ("redis://[::1", "unclosed '['"),
            ("redis+unix://", "absolute socket path"),
            ("redis+unix://relative.sock", "absolute socket path"),
            ("redis+cluster://", "at least one host"),
            ("redis+cluster://h1:1,,h2:2", "stray comma"),
            #[cfg(feature = "redis")]
            ("redis+cluster://h1:1/x", "Invalid database number"),
            #[cfg(feature = "redis")]
            (
                "rediss+cluster://u:pw@h1:1/x",
                "rediss+cluster://u:***@h1:1/x",
            ),
            ("memcached://", "at least one host"),
            ("memcached://h 1:11211", "invalid character ' '"),
            ("memcached://u:p@h:1", "does not take a user"),
            ("memcached://h:1/db", "only host:port"),
            ("memcached://h:70000", "invalid port"),
        ];
        for (url, want) in cases {
            let err = BackendUrl::parse(url).unwrap_err();
            assert!(
                matches!(err, BackendError::InvalidUrl { .. }),
                "{url}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(want), "{url}: {msg:?} lacks {want:?}");
            assert!(!msg.contains('\n'), "one line: {msg:?}");
            assert!(!err.is_unavailable(), "{url}: a bad URL is not retryable");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        let err = BackendUrl::parse("redis://user:secret@host:0").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!(err.to_string().contains("user:***@host:0"), "{err}");
        assert_eq!(err.key(), "redis://user:***@host:0");
        let u = BackendUrl::parse("redis://:hunter2@h/1").unwrap();
        assert_eq!(u.to_string(), "redis://:***@h/1");
        #[cfg(feature = "redis")]
        {
            let err = BackendUrl::parse("redis+cluster://u:hunter2@a:1/x").unwrap_err();
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        let c = BackendUrl::parse("redis+cluster://:pw@a:1,b:2").unwrap();
        assert_eq!(c.to_string(), "redis+cluster://a:1,b:2");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(
            redact("redis://user:s3cret@host:1/2"),
            "redis://user:***@host:1/2"
        );
        assert_eq!(redact("redis://:s3cret@host"), "redis://:***@host");
        assert_eq!(redact("redis://user@host"), "redis://user@host");
        assert_eq!(redact("nonsense"), "nonsense");
        assert_eq!(redact("redis://a:b@c/@d"), "redis://a:***@c/@d");
        assert_eq!(
            redact("redis+unix:///s.sock?db=1&pass=x&user=u"),
            "redis+unix:///s.sock?db=1&pass=***&user=u"
        );
        assert_eq!(
            redact("unix:///s.sock?PASSWORD=x"),
            "unix:///s.sock?PASSWORD=***"
        );
        let u = BackendUrl::parse("redis+unix:///s?pass=hunter2").unwrap();
        assert!(!u.to_string().contains("hunter2"), "{u}");
        assert!(!format!("{u:?}").contains("hunter2"), "{u:?}");
    }

    /// Issue 9: a scheme whose backend this build leaves out names the
    /// Cargo feature that brings it.
    #[cfg(not(all(feature = "sqlite", feature = "redis", feature = "memcached")))]
    #[tokio::test]
    async fn unbuilt_schemes_name_their_feature() {
        for (url, feature) in [
            ("sqlite:///tmp/cachelock-unbuilt.sqlite3", "sqlite"),
            ("redis://127.0.0.1:1", "redis"),
            ("memcached://127.0.0.1:1", "memcached"),
        ] {
            let built = match feature {
                "sqlite" => cfg!(feature = "sqlite"),
                "redis" => cfg!(feature = "redis"),
                _ => cfg!(feature = "memcached"),
            };
            if built {
                continue;
            }
            let err = connect(url).await.expect_err(url);
            assert!(matches!(err, BackendError::InvalidUrl { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("`{feature}` Cargo feature")), "{msg}");
        }
    }

    #[test]
    fn display_round_trips() {
        for url in [
            "memory://",
            "sqlite:///tmp/a.db",
            "redis://h:1/0",
            "memcached://a:1,b:2",
            "redis+cluster://a:1,b:2",
        ] {
            let parsed = BackendUrl::parse(url).unwrap();
            assert_eq!(parsed.to_string(), url);
            assert_eq!(BackendUrl::parse(&parsed.to_string()).unwrap(), parsed);
        }
    }
}
