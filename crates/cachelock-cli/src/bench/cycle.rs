//! `bench cycle`: one client, N non-blocking acquire + release cycles.

use std::time::Duration;

use cachelock::{CacheLock, LockOptions, Released};
use serde::Serialize;
use tokio::time::Instant;

use super::report::{median, print};
use super::{Output, progress, run_key};
use crate::common::{Connected, Fail, Global};

/// Arguments of `bench cycle`.
#[derive(Debug, clap::Args)]
pub struct CycleArgs {
    /// Number of acquire + release cycles.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub n: u64,
    #[command(flatten)]
    pub out: Output,
}

/// What `bench cycle` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CycleReport {
    pub workload: &'static str,
    pub backend: &'static str,
    pub cycles: u64,
    pub seconds: f64,
    pub cycles_per_s: f64,
    pub p50_us: f64,
}

/// Runs `bench cycle`.
pub async fn run(global: &Global, args: CycleArgs) -> Result<u8, Fail> {
    if args.n == 0 {
        return Err(Fail::error("-n must be at least 1"));
    }
    let Connected { url, backend, .. } = global.connect(None).await?;
    let key = run_key(global, "cycle")?;
    let lock = CacheLock::new(
        backend,
        key,
        LockOptions::new().lease(Duration::from_secs(10)),
    )
    .map_err(Fail::error)?;
    let bar = progress(args.n, &args.out, "cycles");
    let mut lat = Vec::with_capacity(usize::try_from(args.n).unwrap_or(0));
    let start = Instant::now();
    for i in 0..args.n {
        let t = Instant::now();
        let guard = lock
            .try_acquire()
            .await
            .map_err(|e| Fail::error(format!("acquire: {e}")))?;
        let released = guard
            .release()
            .await
            .map_err(|e| Fail::error(format!("release: {e}")))?;
        if released != Released::Released {
            return Err(Fail::error(format!(
                "the lock was lost before release ({released:?})"
            )));
        }
        lat.push(t.elapsed().as_secs_f64());
        if i % 256 == 0 {
            bar.set_position(i);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    print(
        args.out.json,
        &CycleReport {
            workload: "cycle",
            backend: url.kind(),
            cycles: args.n,
            seconds,
            cycles_per_s: (args.n as f64 / seconds).round(),
            p50_us: (median(lat) * 1e7).round() / 10.0,
        },
    )?;
    Ok(0)
}
