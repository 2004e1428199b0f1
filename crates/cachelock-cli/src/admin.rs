//! `cachelock status` and `cachelock release`.

use std::time::Duration;

use cachelock::TokenCheck;

use crate::common::{Fail, Global, show_duration};

/// Arguments of `cachelock status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The lock's name (put under --namespace).
    pub key: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

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
    let ttl = match value {
        Some(_) => backend.ttl(&key).await.map_err(fail)?,
        None => None,
    };
    let fence = match value {
        Some(_) => backend.fence(&key).await.map_err(fail)?,
        None => None,
    };
    let holder = value.as_deref().map(cachelock::Holder::parse);
    let token = holder.as_ref().map(|h| printable(h.token.as_bytes()));
    let since = |h: &cachelock::Holder| {
        h.since
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
    };
    let who = holder.as_ref().map(|h| {
        serde_json::json!({
            "host": h.host.as_deref().map(|s| printable(s.as_bytes())),
            "pid": h.pid,
            "command": h.command.as_deref().map(|s| printable(s.as_bytes())),
            "since_unix_ms": since(h),
        })
    });
    if args.json {
        let obj = serde_json::json!({
            "key": key,
            "backend": url.to_string(),
            "held": token.is_some(),
            "token": token,
            "fence": fence,
            "holder": who,
            "ttl_s": ttl.map(|t| t.as_secs_f64()),
        });
        println!("{obj}");
    } else {
        match &token {
            Some(t) => println!(
                "{key}: held by token {t} ({}{})",
                match ttl {
                    Some(t) => format!("expires in {}", show_duration(t)),
                    None => "expiry unknown".into(),
                },
                fence.map(|f| format!(", fence {f}")).unwrap_or_default()
            ),
            None => println!("{key}: free"),
        }
        if let Some(h) = &holder {
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
    Ok(if token.is_some() { 0 } else { 1 })
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
            Some(v) if cachelock::Holder::parse(&v).token != *token => TokenCheck::Mismatch,
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
        let by = holder.map(|v| format!(" (was held by token {})", printable(&v)));
        println!("{key}: force-released{}", by.unwrap_or_default());
        Ok(0)
    } else {
        eprintln!("cachelock: {key} is not held; nothing released");
        Ok(1)
    }
}

/// A cache value shown safely: lossy UTF-8, escaped, at most 80 characters.
fn printable(v: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(v).chars().take(80).collect();
    s.escape_debug().to_string()
}
