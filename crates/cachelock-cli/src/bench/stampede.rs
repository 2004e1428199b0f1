//! `bench stampede`: P processes (T tasks each) call memoize on one cold key
//! at once; `computes` counts how often the value was computed.

use std::time::Duration;

use cachelock::{Cache, LockOptions, SharedBackend};
use serde::{Deserialize, Serialize};

use super::report::{median, print};
use super::workers::{WorkerArgs, Workload, common_start, now_us, run_workers, sleep_until_us};
use super::{Output, progress, run_key};
use crate::common::{Connected, Fail, Global, parse_duration};

/// Arguments of `bench stampede`.
#[derive(Debug, clap::Args)]
pub struct StampedeArgs {
    /// Number of worker processes.
    #[arg(long, default_value_t = 16)]
    pub procs: usize,
    /// Tasks per process, each calling memoize once.
    #[arg(long, default_value_t = 1)]
    pub tasks: usize,
    /// How long the computation takes.
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration)]
    pub compute: Duration,
    /// Memoize without the lock (shows the stampede the lock prevents).
    #[arg(long)]
    pub no_lock: bool,
    #[command(flatten)]
    pub out: Output,
}

/// What `bench stampede` reports.
#[derive(Debug, Clone, Serialize)]
pub struct StampedeReport {
    pub workload: &'static str,
    pub backend: &'static str,
    pub lock: bool,
    pub procs: usize,
    pub tasks: usize,
    pub compute_s: f64,
    pub computes: u64,
    pub p50_s: f64,
    pub max_s: f64,
}

/// What one worker reports: for each caller, the time from the common
/// start to its result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    pub times_s: Vec<f64>,
}

/// Runs `bench stampede`.
pub async fn run(global: &Global, args: StampedeArgs) -> Result<u8, Fail> {
    if args.procs == 0 || args.tasks == 0 {
        return Err(Fail::error("--procs and --tasks must be at least 1"));
    }
    let Connected { url, backend, .. } = global.connect(None).await?;
    let key = run_key(global, "stampede")?;
    let counter = format!("{key}:computes");
    let wargs = WorkerArgs {
        workload: Workload::Stampede,
        key: key.clone(),
        counter: counter.clone(),
        start_us: common_start(args.procs),
        duration: args.compute,
        retry_interval: Duration::from_millis(1),
        check: false,
        tasks: args.tasks,
        no_lock: args.no_lock,
        spec: String::new(),
    };
    let bar = progress(args.procs as u64, &args.out, "workers done");
    let reports: Vec<WorkerReport> =
        run_workers(global, &url, &backend, args.procs, &wargs, &bar, worker).await?;
    bar.finish_and_clear();
    let times: Vec<f64> = reports.into_iter().flat_map(|r| r.times_s).collect();
    let computes: u64 = backend
        .get(&counter)
        .await
        .map_err(|e| Fail::error(format!("cannot read the counter: {e}")))?
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
        .unwrap_or(0);
    let _ = backend.delete(&counter).await;
    let max_s = times.iter().copied().fold(0.0, f64::max);
    print(
        args.out.json,
        &StampedeReport {
            workload: "stampede",
            backend: url.kind(),
            lock: !args.no_lock,
            procs: args.procs,
            tasks: args.tasks,
            compute_s: args.compute.as_secs_f64(),
            computes,
            p50_s: median(times),
            max_s,
        },
    )?;
    Ok(0)
}

/// One worker: T tasks call memoize on the cold key at the common start.
pub async fn worker(backend: SharedBackend, args: WorkerArgs) -> Result<WorkerReport, Fail> {
    // One handle per worker, as one process would have: with memory://
    // the workers are tasks of one process but do not share a single flight.
    let mut builder = Cache::builder(backend.clone())
        .namespace("")
        .expiration(Duration::from_secs(600))
        .lock_on_miss(!args.no_lock);
    if !args.no_lock {
        // A lease well past the compute time, so the lock never runs out
        // while the value is being computed.
        let lease = (args.duration * 4).max(Duration::from_secs(30));
        builder = builder.lock(LockOptions::new().lease(lease));
    }
    let cache = builder
        .build()
        .map_err(|e| Fail::error(format!("memoize: {e}")))?;
    sleep_until_us(args.start_us).await;
    let mut tasks = Vec::with_capacity(args.tasks);
    for _ in 0..args.tasks {
        let (backend, cache) = (backend.clone(), cache.clone());
        let (key, counter, compute) = (args.key.clone(), args.counter.clone(), args.duration);
        let start_us = args.start_us;
        tasks.push(tokio::spawn(async move {
            let value: u64 = cache
                .try_get_with(key.as_str(), || async move {
                    backend.incr(&counter, 1).await?;
                    tokio::time::sleep(compute).await;
                    Ok::<u64, cachelock::BackendError>(42)
                })
                .await
                .map_err(|e| Fail::error(format!("memoize: {e}")))?;
            if value != 42 {
                return Err(Fail::error(format!("memoize returned {value}, not 42")));
            }
            Ok(now_us().saturating_sub(start_us) as f64 / 1e6)
        }));
    }
    let mut times_s = Vec::with_capacity(args.tasks);
    for t in tasks {
        times_s.push(
            t.await
                .map_err(|e| Fail::error(format!("stampede task: {e}")))??,
        );
    }
    Ok(WorkerReport { times_s })
}
