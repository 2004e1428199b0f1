//! What every subcommand shares: global options, backend selection, errors.

use std::path::PathBuf;
use std::time::Duration;

use cachelock::{BackendUrl, KeyBuilder, SharedBackend};

/// The exit code for usage errors, bad URLs and backend failures.
pub const EXIT_ERROR: u8 = 2;

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
    /// Cache backend URL [default: sqlite file in the user's cache dir].
    #[arg(long, env = "CACHELOCK_BACKEND", global = true, value_name = "URL")]
    pub backend: Option<String>,
    /// Namespace put before KEY in the cache key ("" for none).
    #[arg(
        long,
        env = "CACHELOCK_NAMESPACE",
        global = true,
        default_value = "cachelock",
        value_name = "NS"
    )]
    pub namespace: String,
    /// Log more (-v: info, -vv: debug) on stderr; or set CACHELOCK_LOG.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Global {
    /// The backend URL chosen: `--backend`, `CACHELOCK_BACKEND`, or the
    /// default SQLite file (its directory is created, private to the user).
    pub fn backend_url(&self) -> Result<BackendUrl, Fail> {
        match &self.backend {
            Some(url) => BackendUrl::parse(url).map_err(Fail::error),
            None => Ok(BackendUrl::Sqlite(default_sqlite_path()?)),
        }
    }

    /// Connects to the chosen backend.
    pub async fn connect(&self) -> Result<(BackendUrl, SharedBackend), Fail> {
        let url = self.backend_url()?;
        let backend = url.connect().await.map_err(|e| match e {
            cachelock::BackendError::InvalidUrl { .. } => Fail::error(e),
            e => Fail::error(format!("cannot use backend {url}: {e}")),
        })?;
        Ok((url, backend))
    }

    /// Connects to the chosen backend, refusing `memory://`, which no other
    /// process can see (so a lock in it would exclude nothing).
    pub async fn connect_shared(&self) -> Result<(BackendUrl, SharedBackend), Fail> {
        if self.backend_url()? == BackendUrl::Memory {
            return Err(Fail::error(
                "memory:// lives inside one process, so a lock in it excludes nobody; \
                 use the default (sqlite), redis:// or memcached:// (memory:// is for bench)",
            ));
        }
        self.connect().await
    }

    /// The full cache key for the user's `key`.
    pub fn cache_key(&self, key: &str) -> Result<String, Fail> {
        if key.is_empty() {
            return Err(Fail::error("the KEY must not be empty"));
        }
        Ok(KeyBuilder::new(self.namespace.clone()).build(key))
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

/// Parses a humantime duration ("30s", "1m 30s", "250ms").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 1m, 250ms)"))
}

/// Formats a duration for people, to the millisecond.
pub fn show_duration(d: Duration) -> String {
    let ms = Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    humantime::format_duration(ms).to_string()
}

/// Sets up tracing on stderr: `CACHELOCK_LOG` if set, else by `-v`.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "error",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CACHELOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
