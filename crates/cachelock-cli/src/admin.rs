//! `cachelock status`, `cachelock list` and `cachelock release`.

use std::time::Duration;

use cachelock::{KeyBuilder, TokenCheck};

use crate::common::{Fail, Global, printable, show_duration};

/// Arguments of `cachelock status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The lock's name (put under --namespace).
    pub key: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `cachelock list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// List only locks whose name starts with PREFIX (put under
    /// --namespace); all of the namespace's locks without it.
    pub prefix: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Show at most N locks (the listing says when there were more).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub limit: usize,
}

/// Exit code of `cachelock list` when the backend cannot list (Memcached).
pub const EXIT_CANNOT_LIST: u8 = 3;

/// Arguments of `cachelock release`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("how").required(true).args(["force", "token"])))]
pub struct ReleaseArgs {
    /// The lock's name (put under --namespace).
    pub key: String,
    /// DANGEROUS: delete the lock whoever holds it. The holder keeps running
    /// and another process can take the lock at once; for stuck locks only.
    #[arg(long)]
    pub force: bool,
    /// Release only if the lock holds this token (the holder's
    /// CACHELOCK_TOKEN); safe.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
}

/// Shows whether the key is held. Exit 0 held, 1 free.
pub async fn status(global: &Global, args: StatusArgs) -> Result<u8, Fail> {
    let key = global.cache_key(&args.key)?;
    let conn = global.connect_shared().await?;
    let (url, backend) = (conn.url, conn.backend);
    let fail = |e: cachelock::BackendError| Fail::error(format!("cannot read {key:?}: {e}"));
    let value = backend.get(&key).await.map_err(fail)?;
    let lock = match value {
        Some(value) => {
            let ttl = backend.ttl(&key).await.map_err(fail)?;
            let fence = backend.fence(&key).await.map_err(fail)?;
            Some(Shown::new(
                key.clone(),
                global.lock_holder(&backend, &value),
                ttl,
                fence,
            ))
        }
        None => None,
    };
    if args.json {
        let mut obj = match &lock {
            Some(l) => l.json(),
            None => serde_json::json!({
                "key": key,
                "token": null,
                "fence": null,
                "holder": null,
                "ttl_s": null,
            }),
        };
        obj["backend"] = url.to_string().into();
        obj["held"] = lock.is_some().into();
        println!("{obj}");
    } else {
        match &lock {
            Some(l) => l.print(),
            None => println!("{key}: free"),
        }
    }
    Ok(if lock.is_some() { 0 } else { 1 })
}

/// Lists the held locks under the namespace (and PREFIX). Exit 0 (even
/// when none is held), 2 error, 3 the backend cannot list.
pub async fn list(global: &Global, args: ListArgs) -> Result<u8, Fail> {
    let prefix = KeyBuilder::new(global.namespace()).build(args.prefix.unwrap_or_default());
    let conn = global.connect_shared().await?;
    let (url, backend) = (conn.url, conn.backend);
    let fail = |e: cachelock::BackendError| match e {
        e @ cachelock::BackendError::Unsupported { .. } => Fail {
            code: EXIT_CANNOT_LIST,
            message: format!("{e} ({url}); ask for one lock with `cachelock status KEY`"),
        },
        e => Fail::error(format!("cannot list locks under {prefix:?}: {e}")),
    };
    // One more than shown, to tell whether there were more.
    let mut found = backend
        .list(&prefix, args.limit.saturating_add(1))
        .await
        .map_err(fail)?;
    // The fence counters next to the locks are not locks.
    found.retain(|l| !is_fence_counter(l));
    found.sort_by(|a, b| a.key.cmp(&b.key));
    let truncated = found.len() > args.limit;
    found.truncate(args.limit);
    let mut locks = Vec::with_capacity(found.len());
    for l in found {
        let fence = backend.fence(&l.key).await.map_err(fail)?;
        locks.push(Shown::new(
            l.key,
            global.lock_holder(&backend, &l.value),
            l.ttl,
            fence,
        ));
    }
    if args.json {
        let obj = serde_json::json!({
            "backend": url.to_string(),
            "prefix": prefix,
            "locks": locks.iter().map(Shown::json).collect::<Vec<_>>(),
            "truncated": truncated,
        });
        println!("{obj}");
    } else {
        if locks.is_empty() {
            println!("no locks held under {prefix:?}");
        }
        for l in &locks {
            l.print();
        }
        if truncated {
            println!("(only the first {} shown; there are more)", args.limit);
        }
    }
    Ok(0)
}

/// Whether a listed key is a lock's fence counter (`...:fence` holding a
/// number), not a lock.
fn is_fence_counter(l: &cachelock::Listed) -> bool {
    l.key.ends_with(":fence")
        && std::str::from_utf8(&l.value).is_ok_and(|v| v.trim().parse::<u64>().is_ok())
}

/// A held lock as `status` and `list` show it.
struct Shown {
    key: String,
    holder: cachelock::Holder,
    ttl: Option<Duration>,
    fence: Option<u64>,
}

impl Shown {
    fn new(
        key: String,
        holder: cachelock::Holder,
        ttl: Option<Duration>,
        fence: Option<u64>,
    ) -> Self {
        Self {
            key,
            holder,
            ttl,
            fence,
        }
    }

    fn json(&self) -> serde_json::Value {
        let h = &self.holder;
        let since = h
            .since
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        serde_json::json!({
            "key": self.key,
            "token": printable(h.token.as_bytes()),
            "fence": self.fence,
            "holder": {
                "host": h.host.as_deref().map(|s| printable(s.as_bytes())),
                "pid": h.pid,
                "command": h.command.as_deref().map(|s| printable(s.as_bytes())),
                "since_unix_ms": since,
            },
            "ttl_s": self.ttl.map(|t| t.as_secs_f64()),
        })
    }

    fn print(&self) {
        let h = &self.holder;
        println!(
            "{}: held by token {} ({}{})",
            self.key.escape_debug(),
            printable(h.token.as_bytes()),
            match self.ttl {
                Some(t) => format!("expires in {}", show_duration(t)),
                None => "expiry unknown".into(),
            },
            self.fence
                .map(|f| format!(", fence {f}"))
                .unwrap_or_default()
        );
        let mut parts = Vec::new();
        if let Some(host) = &h.host {
            parts.push(format!("host {}", printable(host.as_bytes())));
        }
        if let Some(pid) = h.pid {
            parts.push(format!("pid {pid}"));
        }
        if let Some(age) = h
            .since
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        {
            parts.push(format!("since {} ago", show_duration(age)));
        }
        if let Some(cmd) = &h.command {
            parts.push(format!("command {}", printable(cmd.as_bytes())));
        }
        if !parts.is_empty() {
            println!("  holder: {}", parts.join(", "));
        }
    }
}

/// Releases a lock: owner-checked with --token, unconditionally with
/// --force. Exit 0 released, 1 nothing released.
pub async fn release(global: &Global, args: ReleaseArgs) -> Result<u8, Fail> {
    let key = global.cache_key(&args.key)?;
    let backend = global.connect_shared().await?.backend;
    let fail = |e: cachelock::BackendError| Fail::error(format!("cannot release {key:?}: {e}"));
    if let Some(token) = &args.token {
        // The stored value is the token followed by who holds it: compare
        // the token, then delete that very value, owner-checked.
        let stored = backend.get(&key).await.map_err(fail)?;
        let check = match stored {
            None => TokenCheck::Missing,
            Some(v) if global.lock_holder(&backend, &v).token != *token => TokenCheck::Mismatch,
            Some(v) => backend
                .delete_if_eq(&key, &v, Duration::from_secs(5))
                .await
                .map_err(fail)?,
        };
        return match check {
            TokenCheck::Matched => {
                println!("{key}: released");
                Ok(0)
            }
            TokenCheck::Mismatch => {
                eprintln!("cachelock: {key} is held by another token; nothing released");
                Ok(1)
            }
            TokenCheck::Missing => {
                eprintln!("cachelock: {key} is not held; nothing released");
                Ok(1)
            }
        };
    }
    let holder = backend.get(&key).await.map_err(fail)?;
    if backend.delete(&key).await.map_err(fail)? {
        let by = holder.map(|v| {
            format!(
                " (was held by token {})",
                global.show_lock_value(&backend, &v)
            )
        });
        println!("{key}: force-released{}", by.unwrap_or_default());
        Ok(0)
    } else {
        eprintln!("cachelock: {key} is not held; nothing released");
        Ok(1)
    }
}
