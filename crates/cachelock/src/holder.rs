//! Who holds a lock: written after the token in the lock's value, so that
//! `cachelock status` and [`CacheLock::holder`](crate::CacheLock::holder)
//! can say who it is.
//!
//! The value is `TOKEN host=HOST pid=PID since=UNIX_MS[ cmd=COMMAND]`. The
//! token stays the owner check (release and extend compare the whole value,
//! which is unique because the token is). What is read back is never
//! trusted: it is parsed lossily from at most [`MAX_VALUE`] bytes, and a
//! field that does not parse is left out.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// The longest host name written (in characters); longer ones are cut.
const MAX_HOST: usize = 64;
/// The longest command written (in characters); longer ones are cut.
const MAX_COMMAND: usize = 256;
/// The most bytes of a stored value that are parsed.
pub const MAX_VALUE: usize = 1024;

/// Who holds a lock, as its value says. Every field may be missing (a value
/// written by another program or an older cachelock).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Holder {
    /// The holder's token (the owner check).
    pub token: String,
    /// The host name of the holder's machine.
    pub host: Option<String>,
    /// The holder's process id.
    pub pid: Option<u32>,
    /// When it took the lock, by its clock.
    pub since: Option<SystemTime>,
    /// The command it runs (`cachelock run`), cut to 256 characters.
    pub command: Option<String>,
}

/// This machine's host name, read once (`unknown` if it cannot be told).
fn host() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let host = clean(raw.trim(), MAX_HOST, true);
        if host.is_empty() {
            "unknown".to_owned()
        } else {
            host
        }
    })
}

/// `s` with control characters (and, if `word`, spaces) replaced by `_`,
/// cut to `max` characters.
fn clean(s: &str, max: usize, word: bool) -> String {
    s.chars()
        .take(max)
        .map(|c| {
            if c.is_control() || (word && c.is_whitespace()) {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The value a lock stores: the token, then who we are.
pub(crate) fn encode(token: &str, command: Option<&str>) -> String {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut value = format!(
        "{token} host={} pid={} since={since}",
        host(),
        std::process::id()
    );
    if let Some(cmd) = command {
        value.push_str(" cmd=");
        value.push_str(&clean(cmd, MAX_COMMAND, false));
    }
    value
}

impl Holder {
    /// Reads a lock's value, lossily and only its first 1 KiB, so memory stays
    /// bounded whatever the value holds.
    pub fn parse(value: &[u8]) -> Self {
        let value = value.get(..MAX_VALUE).unwrap_or(value);
        let text = String::from_utf8_lossy(value);
        let (token, rest) = text.split_once(' ').unwrap_or((&text, ""));
        let (fields, command) = match rest.split_once("cmd=") {
            Some((fields, cmd)) => (fields, Some(clean(cmd, MAX_COMMAND, false))),
            None => (rest, None),
        };
        let mut holder = Self {
            token: clean(token, 64, true),
            command,
            ..Self::default()
        };
        for field in fields.split(' ') {
            match field.split_once('=') {
                Some(("host", h)) if !h.is_empty() => holder.host = Some(clean(h, MAX_HOST, true)),
                Some(("pid", p)) => holder.pid = p.parse().ok(),
                Some(("since", t)) => {
                    holder.since = t.parse().ok().and_then(|ms| {
                        SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
                    });
                }
                _ => {}
            }
        }
        holder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_bounded() {
        let v = encode("tok", Some("sh -c 'echo hi'\nrm"));
        let h = Holder::parse(v.as_bytes());
        assert_eq!(h.token, "tok");
        assert_eq!(h.pid, Some(std::process::id()));
        assert_eq!(h.host.as_deref(), Some(host()));
        assert_eq!(h.command.as_deref(), Some("sh -c 'echo hi'_rm"));
        assert!(h.since.is_some());

        let long = encode("tok", Some(&"x".repeat(10_000)));
        assert!(long.len() < 600, "{}", long.len());
        assert_eq!(Holder::parse(long.as_bytes()).command.unwrap().len(), 256);
    }

    #[test]
    fn hostile_values_parse_to_what_they_can() {
        let h = Holder::parse(b"bare-token");
        assert_eq!(h.token, "bare-token");
        assert_eq!(
            (h.host, h.pid, h.since, h.command),
            (None, None, None, None)
        );
        let h = Holder::parse(b"t pid=-1 since=99999999999999999999999 host=\xff\x1b[31m");
        assert_eq!(h.pid, None);
        assert_eq!(h.since, None);
        assert_eq!(h.host.as_deref(), Some("\u{fffd}_[31m"));
        let huge = vec![b'a'; 1 << 20];
        assert_eq!(Holder::parse(&huge).token.len(), 64);
    }
}
