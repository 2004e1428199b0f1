//! `bench handoff`: the time from one holder's release to the next holder's
//! acquire, with the waiter already queued, at the lock's default settings.
//!
//! Two clients (two backend connections, as two processes have; one shared
//! backend for `memory://`) take turns: one holds the lock while the other
//! waits in `acquire`; after a settle time the holder releases, and the
//! time from just before that release to the waiter's acquire returning is
//! one sample. Notifying backends (Redis, memory) hand off in about a
//! notification plus a round trip; polling ones (Memcached, SQLite) within
//! one poll interval.

use std::time::Duration;

use cachelock::{CacheLock, LockOptions, Released};
use serde::Serialize;
use tokio::time::Instant;

use super::report::{median, print};
use super::{Output, progress, run_key};
use crate::common::{Connected, Fail, Global};

/// Arguments of `bench handoff`.
#[derive(Debug, clap::Args)]
pub struct HandoffArgs {
    /// Number of hand-offs.
    #[arg(short = 'n', long, default_value_t = 200)]
    pub n: u64,
    /// How long the holder keeps the lock after the waiter started, so that
    /// the waiter is queued (made its attempt and waits) when it is released.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    #[command(flatten)]
    pub out: Output,
}

/// What `bench handoff` reports.
#[derive(Debug, Clone, Serialize)]
pub struct HandoffReport {
    pub workload: &'static str,
    pub backend: &'static str,
    pub handoffs: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// The `q` quantile (0..=1) of `v`, nearest rank.
fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let last = v.len() - 1;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let i = ((last as f64) * q).round() as usize;
    v.get(i.min(last)).copied().unwrap_or(0.0)
}

fn us(seconds: f64) -> f64 {
    (seconds * 1e7).round() / 10.0
}

/// Runs `bench handoff`.
pub async fn run(global: &Global, args: HandoffArgs) -> Result<u8, Fail> {
    if args.n == 0 {
        return Err(Fail::error("-n must be at least 1"));
    }
    let Connected { url, backend, .. } = global.connect(None).await?;
    let other = if url.kind() == "memory" {
        backend.clone()
    } else {
        global.connect(None).await?.backend
    };
    let key = run_key(global, "handoff")?;
    let options = LockOptions::new().lease(Duration::from_secs(10));
    let locks = [
        CacheLock::new(backend, key.clone(), options.clone()).map_err(Fail::error)?,
        CacheLock::new(other, key, options).map_err(Fail::error)?,
    ];
    let bar = progress(args.n, &args.out, "hand-offs");
    let mut lat = Vec::with_capacity(usize::try_from(args.n).unwrap_or(0));
    let mut holder = locks[0]
        .try_acquire()
        .await
        .map_err(|e| Fail::error(format!("acquire: {e}")))?;
    for i in 0..args.n {
        let next = locks[usize::from(i % 2 == 0)].clone();
        let waiter = tokio::spawn(async move {
            let guard = next.acquire().await;
            (guard, Instant::now())
        });
        tokio::time::sleep(args.settle).await;
        let released_at = Instant::now();
        let released = holder
            .release()
            .await
            .map_err(|e| Fail::error(format!("release: {e}")))?;
        if released != Released::Released {
            return Err(Fail::error(format!(
                "the lock was lost before release ({released:?})"
            )));
        }
        let (guard, acquired_at) = waiter
            .await
            .map_err(|e| Fail::error(format!("the waiter failed: {e}")))?;
        holder = guard.map_err(|e| Fail::error(format!("acquire: {e}")))?;
        lat.push(
            acquired_at
                .saturating_duration_since(released_at)
                .as_secs_f64(),
        );
        bar.set_position(i + 1);
    }
    let _ = holder.release().await;
    bar.finish_and_clear();
    let max = lat.iter().copied().fold(0.0, f64::max);
    print(
        args.out.json,
        &HandoffReport {
            workload: "handoff",
            backend: url.kind(),
            handoffs: args.n,
            p50_us: us(median(lat.clone())),
            p99_us: us(quantile(lat, 0.99)),
            max_us: us(max),
        },
    )?;
    Ok(0)
}
