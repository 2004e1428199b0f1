//! What every subcommand shares: global options, backend selection, errors,
//! durations and messages.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cachelock::{BackendUrl, Compat, KeyBuilder, SharedBackend};

/// The exit code for usage errors, bad URLs and backend failures.
pub const EXIT_ERROR: u8 = 2;

/// The longest duration any option accepts: 30 days. Longer leases would be
/// read by Memcached as a date, and nothing a lock does needs more.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// How long `-n` waits for another process's write lock on the SQLite file
/// (the default busy timeout, used otherwise, is 10 s).
pub const NO_WAIT_BUSY_TIMEOUT: Duration = Duration::from_millis(500);

/// A failure that ends the command with `code` and prints `message` on one
/// line of stderr.
#[derive(Debug)]
pub struct Fail {
    pub code: u8,
    pub message: String,
}

impl Fail {
    /// A failure with exit code 2.
    pub fn error(message: impl std::fmt::Display) -> Self {
        Self {
            code: EXIT_ERROR,
            message: one_line(&message.to_string()),
        }
    }
}

/// Collapses newlines so every error message stays on one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Options accepted by every subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// Cache backend URL [default: sqlite file in the user's cache dir; an
    /// empty value means the default too].
    #[arg(long, env = "CACHELOCK_BACKEND", global = true, value_name = "URL")]
    pub backend: Option<String>,
    /// Namespace put before KEY in the cache key ("" for none) [default:
    /// "cachelock"; with --django "", and there it is djblets' site part:
    /// the Site domain if the Django project has the sites app].
    #[arg(long, env = "CACHELOCK_NAMESPACE", global = true, value_name = "NS")]
    pub namespace: Option<String>,
    /// Share locks with djblets' CacheLock on the same Django cache: Django's
    /// keys ("PREFIX:VERSION:KEY") and values (a pickled str on Redis, text
    /// with flags 16 on Memcached). Same as --compat django.
    #[arg(long, global = true)]
    pub django: bool,
    /// Whose locks to share: native (cachelock's own format) or django
    /// (see --django).
    #[arg(
        long,
        env = "CACHELOCK_COMPAT",
        global = true,
        value_enum,
        default_value_t = CompatArg::Native,
        value_name = "MODE"
    )]
    pub compat: CompatArg,
    /// With --django: Django's KEY_PREFIX setting of that cache.
    #[arg(
        long,
        env = "CACHELOCK_DJANGO_PREFIX",
        global = true,
        default_value = "",
        value_name = "PREFIX"
    )]
    pub django_prefix: String,
    /// With --django: Django's VERSION setting of that cache.
    #[arg(
        long,
        env = "CACHELOCK_DJANGO_VERSION",
        global = true,
        default_value_t = 1,
        value_name = "N"
    )]
    pub django_version: u32,
    /// PEM file of the CA that signed a rediss:// server's certificate, used
    /// instead of the system's roots (a private CA). No effect without TLS.
    #[arg(long, env = "CACHELOCK_TLS_CA", global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Say what happens (-v: getting the lock took N s, running CMD,
    /// released), like flock --verbose; -vv and -vvv add the library's logs.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The values of `--compat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompatArg {
    /// cachelock's own keys and values.
    Native,
    /// djblets' `CacheLock` on a Django cache.
    Django,
}

/// A backend connection and what was asked for.
pub struct Connected {
    pub url: BackendUrl,
    pub backend: SharedBackend,
    /// For SQLite: the file's identity when it was opened.
    pub sqlite: Option<FileId>,
}

/// A file's device and inode, to notice that its path now names another
/// file or none (`rm -rf ~/.cache` while a lock is held in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileId {
    pub path: PathBuf,
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Self {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Whether the path still names the file that was opened.
    pub fn still_there(&self) -> bool {
        Self::of(&self.path).is_ok_and(|now| now == *self)
    }
}

impl Global {
    /// The backend URL chosen: `--backend`, `CACHELOCK_BACKEND`, or (also
    /// when either is empty) the default SQLite file, whose directory is
    /// then created, private to the user.
    pub fn backend_url(&self) -> Result<BackendUrl, Fail> {
        match self.backend.as_deref().map(str::trim) {
            Some(url) if !url.is_empty() => BackendUrl::parse(url).map_err(Fail::error),
            _ => Ok(BackendUrl::Sqlite(default_sqlite_path()?)),
        }
    }

    /// The `--tls-ca` file's contents, if one was given.
    pub fn tls_ca_pem(&self) -> Result<Option<Vec<u8>>, Fail> {
        match &self.tls_ca {
            Some(path) if !path.as_os_str().is_empty() => {
                std::fs::read(path).map(Some).map_err(|e| {
                    Fail::error(format!(
                        "cannot read the --tls-ca file {}: {e}",
                        path.display()
                    ))
                })
            }
            _ => Ok(None),
        }
    }

    /// Connects to the chosen backend (see [`open`](Self::open)).
    pub async fn connect(&self, busy: Option<Duration>) -> Result<Connected, Fail> {
        let url = self.backend_url()?;
        let tls_ca = self.tls_ca_pem()?;
        self.open(url, tls_ca, busy).await
    }

    /// Connects to `url`, trusting `tls_ca` (PEM) for TLS if given. `busy`
    /// is the SQLite busy timeout (`None`: the library's default). Any
    /// failure here is the backend's, not the user's.
    pub async fn open(
        &self,
        url: BackendUrl,
        tls_ca: Option<Vec<u8>>,
        busy: Option<Duration>,
    ) -> Result<Connected, Fail> {
        let connected = match (&url, tls_ca) {
            (BackendUrl::Sqlite(path), _) => {
                let busy = busy.unwrap_or(cachelock::backend::sqlite::DEFAULT_BUSY_TIMEOUT);
                cachelock::SqliteBackend::open_with_busy_timeout(path, busy)
                    .await
                    .map(|b| Arc::new(b) as SharedBackend)
            }
            (BackendUrl::Redis(u), Some(pem)) => cachelock::RedisBackend::connect_with(
                u,
                cachelock::RedisOptions::new().tls_root_certificate(pem),
            )
            .await
            .map(|b| Arc::new(b) as SharedBackend),
            (BackendUrl::RedisCluster(nodes), Some(pem)) => {
                let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
                cachelock::RedisBackend::connect_cluster_with(
                    &nodes,
                    cachelock::RedisOptions::new().tls_root_certificate(pem),
                )
                .await
                .map(|b| Arc::new(b) as SharedBackend)
            }
            _ => url.connect().await,
        };
        let backend = connected.map_err(|e| match e {
            cachelock::BackendError::InvalidUrl { .. } => Fail::error(e),
            e => Fail::error(format!("cannot use backend {url}: {e}")),
        })?;
        let sqlite = match &url {
            BackendUrl::Sqlite(path) => Some(FileId::of(path).map_err(|e| {
                Fail::error(format!(
                    "cannot look at the SQLite file {}: {e}",
                    path.display()
                ))
            })?),
            _ => None,
        };
        Ok(Connected {
            url,
            backend,
            sqlite,
        })
    }

    /// Refuses `memory://`, which no other process can see (so a lock in it
    /// would exclude nobody).
    pub fn refuse_memory(&self) -> Result<(), Fail> {
        if self.backend_url()? == BackendUrl::Memory {
            return Err(Fail::error(
                "memory:// lives inside one process, so a lock in it excludes nobody; \
                 use the default (sqlite), redis:// or memcached:// (memory:// is for bench)",
            ));
        }
        Ok(())
    }

    /// Connects to the chosen backend, refusing `memory://`.
    pub async fn connect_shared(&self) -> Result<Connected, Fail> {
        self.refuse_memory()?;
        self.connect(None).await
    }

    /// The compatibility mode: `--django` or `--compat`.
    pub fn compat(&self) -> Compat {
        if self.django || self.compat == CompatArg::Django {
            Compat::Django
        } else {
            Compat::Native
        }
    }

    /// The namespace: `--namespace`, or the mode's default.
    pub fn namespace(&self) -> &str {
        match (&self.namespace, self.compat()) {
            (Some(ns), _) => ns,
            (None, Compat::Django) => "",
            (None, _) => cachelock::DEFAULT_NAMESPACE,
        }
    }

    /// The full cache key for the user's `key`: `NS:KEY`, and with
    /// `--django` Django's `PREFIX:VERSION:NS:KEY`.
    pub fn cache_key(&self, key: &str) -> Result<String, Fail> {
        if key.is_empty() {
            return Err(Fail::error("the KEY must not be empty"));
        }
        Ok(match self.compat() {
            Compat::Django => {
                let ns = self.namespace();
                let inner = if ns.is_empty() {
                    key.to_owned()
                } else {
                    format!("{ns}:{key}")
                };
                KeyBuilder::django(&self.django_prefix, self.django_version).build(inner)
            }
            _ => KeyBuilder::new(self.namespace()).build(key),
        })
    }

    /// Who holds a lock, from its value read back (parsed lossily): in
    /// cachelock's own format the token and holder, in Django's the token
    /// alone, decoded.
    pub fn lock_holder(&self, backend: &SharedBackend, value: &[u8]) -> cachelock::Holder {
        match self.compat() {
            Compat::Django => {
                match backend.decode_lock_value(value, self.compat().value_format()) {
                    Some(token) => cachelock::Holder::parse(token.as_bytes()),
                    None => cachelock::Holder::parse(value),
                }
            }
            _ => cachelock::Holder::parse(value),
        }
    }

    /// The token in a lock value read back: decoded in this mode, else
    /// shown escaped as it is.
    pub fn show_lock_value(&self, backend: &SharedBackend, value: &[u8]) -> String {
        match backend.decode_lock_value(value, self.compat().value_format()) {
            Some(token) => printable(token.as_bytes()),
            None => printable(value),
        }
    }
}

/// `$XDG_CACHE_HOME/cachelock/locks.sqlite3` (`~/.cache/...` on Linux).
///
/// The cache dir, not the runtime dir: `XDG_RUNTIME_DIR` exists only in a
/// login session, so a cron job and an interactive shell of the same user
/// would otherwise use two different files and not exclude each other.
pub fn default_sqlite_path() -> Result<PathBuf, Fail> {
    let Some(base) = dirs::cache_dir() else {
        return Err(Fail::error(
            "no user cache directory (HOME is not set); pass --backend sqlite:///path/locks.sqlite3",
        ));
    };
    let dir = base.join("cachelock");
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(&dir)
        .map_err(|e| Fail::error(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir.join("locks.sqlite3"))
}

/// Parses a duration: bare seconds like flock (`5`, `0.5`) or humantime
/// (`30s`, `1m 30s`, `250ms`), at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = s
            .parse()
            .map_err(|_| format!("{s:?} is not a number of seconds"))?;
        Duration::try_from_secs_f64(secs).map_err(|_| too_long())?
    } else {
        humantime::parse_duration(s)
            .map_err(|e| format!("{e} (examples: 5, 0.5, 30s, 1m, 250ms)"))?
    };
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

fn too_long() -> String {
    format!(
        "durations are at most {} (30days)",
        show_duration(MAX_DURATION)
    )
}

/// A duration for people, rounded: `250ms`, `1.7s`, `42s`, `2m 5s`, `3h 2m`.
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let secs = d.as_secs();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 10_000 {
        let tenths = (ms + 50) / 100;
        if tenths.is_multiple_of(10) {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        }
    } else if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m {}s", secs / 60, secs % 60)
    } else if secs < 86_400 {
        format!("{}h {}m", secs / 3600, (secs % 3600) / 60)
    } else {
        format!("{}d {}h", secs / 86_400, (secs % 86_400) / 3600)
    }
}

/// Whether messages on stderr may use ANSI colour: only on a terminal, and
/// not when `NO_COLOR` is set (<https://no-color.org>).
pub fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Sets up the library's logs on stderr: `CACHELOCK_LOG` if set, else by
/// `-v` (-vv: info, -vvv: debug; below that only errors).
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 | 1 => "error",
        2 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CACHELOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .try_init();
}

/// A cache value shown safely: lossy UTF-8, escaped, at most 80 characters.
pub fn printable(v: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(v).chars().take(80).collect();
    s.escape_debug().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_bare_seconds_and_stay_bounded() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m 30s"), Ok(Duration::from_secs(150)));
        assert_eq!(parse_duration("30days"), Ok(MAX_DURATION));
        for bad in [
            "31days",
            "18446744073709551615s",
            "1e9",
            "99999999999999999999",
            ".",
            "x",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_are_shown_rounded() {
        for (d, want) in [
            (Duration::from_micros(101_735), "101ms"),
            (Duration::from_millis(1735), "1.7s"),
            (Duration::from_millis(2000), "2s"),
            (Duration::from_millis(9960), "10s"),
            (Duration::from_millis(42_600), "42s"),
            (Duration::from_secs(125), "2m 5s"),
            (Duration::from_secs(3 * 3600 + 120), "3h 2m"),
            (MAX_DURATION, "30d 0h"),
        ] {
            assert_eq!(show_duration(d), want);
        }
    }
}
