//! `bench refresh` (issue 12): steady traffic on warm keys that expire.
//!
//! P processes × T tasks send about `--rate` requests a second in total to
//! `--keys` keys with a `--fresh` fresh time and a `--compute` compute, for
//! `--duration`, once per mode, the modes interleaved round by round in one
//! run:
//!
//! * `hit`: the values never expire (the plain-hit baseline for latency);
//! * `plain`: today's single TTL with the lock (the baseline);
//! * `swr`: stale-while-revalidate (one refresher, in its caller);
//! * `early`: XFetch early refresh (β = 1) paired with a try-lock;
//! * `swr-bg`, `early-bg`: the same, through `try_get_with_background` (the
//!   refresh runs in the background; every caller gets the old value);
//! * with `--fail-for D`, `failing` and `failing-bg`: stale-while-revalidate
//!   plus stale-if-error and shared failure records; the compute fails for
//!   D starting 2 s into the run.
//!
//! `--modes` picks some of them (`hit` always runs first, for the ratio).
//!
//! A request "waited for a compute" when it took longer than half the
//! compute time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cachelock::{Cache, Expiration, LockOptions, SharedBackend};
use serde::{Deserialize, Serialize};

use super::report::print;
use super::workers::{WorkerArgs, Workload, common_start, now_us, run_workers, sleep_until_us};
use super::{Output, progress, run_key};
use crate::common::{Connected, Fail, Global, parse_duration};

/// Arguments of `bench refresh`.
#[derive(Debug, clap::Args)]
pub struct RefreshArgs {
    /// Number of worker processes.
    #[arg(long, default_value_t = 8)]
    pub procs: usize,
    /// Tasks per process.
    #[arg(long, default_value_t = 32)]
    pub tasks: usize,
    /// Requests per second, all processes together.
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// Number of keys.
    #[arg(long, default_value_t = 20)]
    pub keys: usize,
    /// Fresh time of a value.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub fresh: Duration,
    /// How long the computation takes.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub compute: Duration,
    /// How long each mode runs, per round.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Rounds (each runs every mode once, in turn).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Also run the failing-compute mode: the compute fails for this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub fail_for: Option<Duration>,
    /// The modes to run, comma-separated (default: all; `hit` always runs).
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// With `--fail-for`: computes allowed per failure window after the first.
    #[arg(long, default_value_t = 1)]
    pub retries: u32,
    #[command(flatten)]
    pub out: Output,
}

/// The settings a worker needs (sent as JSON in `--spec`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spec {
    mode: String,
    keys: usize,
    fresh_ms: u64,
    compute_ms: u64,
    duration_ms: u64,
    interval_us: u64,
    fail_start_ms: u64,
    fail_ms: u64,
    retries: u32,
}

/// What `bench refresh` reports, per mode.
#[derive(Debug, Clone, Serialize)]
pub struct RefreshReport {
    pub workload: &'static str,
    pub backend: &'static str,
    pub mode: String,
    pub round: usize,
    pub requests: u64,
    pub rate_per_s: f64,
    /// Computes per key per expiry after the first fill (goal 1.00).
    pub recomputes_per_expiry: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// p99 over the p99 of the `hit` mode of the same round.
    pub p99_vs_hit: f64,
    /// Requests slower than half the compute time, after the first fill.
    pub waited: u64,
    pub errors: u64,
    /// Failing mode: computes that started in the failure window, per key.
    pub fail_computes_per_key: Option<f64>,
    /// Failing mode: requests in the failure window served a (stale) value.
    pub fail_served: Option<u64>,
}

/// What one worker reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Latency of each request after the first fill, microseconds.
    pub lat_us: Vec<u32>,
    pub computes: u64,
    pub fill_computes: u64,
    pub errors: u64,
    pub fail_computes: u64,
    pub fail_served: u64,
}

/// Runs `bench refresh`.
pub async fn run(global: &Global, args: RefreshArgs) -> Result<u8, Fail> {
    if args.procs == 0 || args.tasks == 0 || args.keys == 0 || args.rate == 0 {
        return Err(Fail::error(
            "--procs, --tasks, --keys and --rate must be at least 1",
        ));
    }
    let Connected { url, backend, .. } = global.connect(None).await?;
    let mut modes = vec!["hit", "plain", "swr", "early", "swr-bg", "early-bg"];
    if args.fail_for.is_some() {
        modes.extend(["failing", "failing-bg"]);
    }
    if let Some(bad) = args.modes.iter().find(|m| !modes.contains(&m.as_str())) {
        return Err(Fail::error(format!(
            "unknown mode {bad} (modes: {}; failing ones need --fail-for)",
            modes.join(", ")
        )));
    }
    if !args.modes.is_empty() {
        modes.retain(|m| *m == "hit" || args.modes.iter().any(|a| a == m));
    }
    let callers = (args.procs * args.tasks) as u64;
    let interval_us = (1_000_000 * callers / args.rate).max(1);
    for round in 1..=args.rounds {
        let mut hit_p99 = None;
        for mode in &modes {
            let spec = Spec {
                mode: (*mode).to_owned(),
                keys: args.keys,
                fresh_ms: args.fresh.as_millis() as u64,
                compute_ms: args.compute.as_millis() as u64,
                duration_ms: args.duration.as_millis() as u64,
                interval_us,
                fail_start_ms: 2000,
                fail_ms: args.fail_for.map_or(0, |d| d.as_millis() as u64),
                retries: args.retries,
            };
            let wargs = WorkerArgs {
                workload: Workload::Refresh,
                key: run_key(global, &format!("refresh:{mode}"))?,
                counter: String::new(),
                start_us: common_start(args.procs),
                duration: args.duration,
                retry_interval: Duration::from_millis(1),
                check: false,
                tasks: args.tasks,
                no_lock: false,
                spec: serde_json::to_string(&spec)
                    .map_err(|e| Fail::error(format!("spec: {e}")))?,
            };
            let bar = progress(args.procs as u64, &args.out, "workers done");
            let reports: Vec<WorkerReport> =
                run_workers(global, &url, &backend, args.procs, &wargs, &bar, worker).await?;
            bar.finish_and_clear();
            let mut lat: Vec<u32> = reports.iter().flat_map(|r| r.lat_us.clone()).collect();
            lat.sort_unstable();
            let pct = |q: f64| -> f64 {
                if lat.is_empty() {
                    return 0.0;
                }
                let i = ((lat.len() as f64 * q) as usize).min(lat.len() - 1);
                f64::from(lat[i]) / 1000.0
            };
            let sum = |f: fn(&WorkerReport) -> u64| reports.iter().map(f).sum::<u64>();
            let computes = sum(|r| r.computes);
            let fill = sum(|r| r.fill_computes);
            let expiries = (args.duration.as_secs_f64() / args.fresh.as_secs_f64()).max(1.0);
            let recomputes = if *mode == "hit" {
                0.0
            } else {
                computes.saturating_sub(fill) as f64 / (args.keys as f64 * expiries)
            };
            let p99 = pct(0.99);
            if *mode == "hit" {
                hit_p99 = Some(p99);
            }
            let half = (args.compute.as_micros() / 2) as u32;
            print(
                args.out.json,
                &RefreshReport {
                    workload: "refresh",
                    backend: url.kind(),
                    mode: (*mode).to_owned(),
                    round,
                    requests: lat.len() as u64,
                    rate_per_s: lat.len() as f64 / args.duration.as_secs_f64(),
                    recomputes_per_expiry: recomputes,
                    p50_ms: pct(0.5),
                    p99_ms: p99,
                    max_ms: lat.last().map_or(0.0, |v| f64::from(*v) / 1000.0),
                    p99_vs_hit: hit_p99.map_or(0.0, |h| if h > 0.0 { p99 / h } else { 0.0 }),
                    waited: lat.iter().filter(|l| **l > half).count() as u64,
                    errors: sum(|r| r.errors),
                    fail_computes_per_key: mode
                        .starts_with("failing")
                        .then(|| sum(|r| r.fail_computes) as f64 / args.keys as f64),
                    fail_served: mode.starts_with("failing").then(|| sum(|r| r.fail_served)),
                },
            )?;
        }
    }
    Ok(0)
}

#[derive(Debug)]
struct Failed;

/// One worker: one handle (one process), T tasks, each sending a request
/// every `interval_us` to the keys in turn.
pub async fn worker(backend: SharedBackend, args: WorkerArgs) -> Result<WorkerReport, Fail> {
    let spec: Spec =
        serde_json::from_str(&args.spec).map_err(|e| Fail::error(format!("bad --spec: {e}")))?;
    let fresh = Duration::from_millis(spec.fresh_ms);
    let window = fresh * 10;
    let background = spec.mode.ends_with("-bg");
    let policy = match spec.mode.trim_end_matches("-bg") {
        "hit" => Expiration::fresh(Duration::from_secs(3600)),
        "plain" => Expiration::fresh(fresh),
        "swr" => Expiration::fresh(fresh).stale_while_revalidate(window),
        "early" => Expiration::fresh(fresh).early_refresh(1.0),
        "failing" => Expiration::fresh(fresh)
            .stale_while_revalidate(window)
            .stale_if_error(window),
        other => return Err(Fail::error(format!("unknown mode {other}"))),
    };
    let mut builder = Cache::builder(backend.clone())
        .namespace(args.key.clone())
        .expiration(policy)
        .lock(LockOptions::new().lease(Duration::from_secs(30)));
    let failing = spec.mode.starts_with("failing");
    if failing {
        builder = builder
            .share_failures(Duration::from_millis(spec.fail_ms.max(1)))
            .failure_retries(spec.retries);
    }
    let cache = builder
        .build()
        .map_err(|e| Fail::error(format!("memoize: {e}")))?;
    sleep_until_us(args.start_us).await;
    let start = Instant::now();
    let compute = Duration::from_millis(spec.compute_ms);
    let computes = Arc::new(AtomicU64::new(0));
    let fail_computes = Arc::new(AtomicU64::new(0));
    // The first fill: every key once, all at once (its computes are
    // counted apart; the run's time starts after it).
    let fills: Vec<_> = (0..spec.keys)
        .map(|k| {
            let (cache, c) = (cache.clone(), computes.clone());
            tokio::spawn(async move {
                let _: Result<u64, _> = cache
                    .try_get_with(format!("k{k}").as_str(), || async move {
                        c.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(compute).await;
                        Ok::<u64, Failed>(1)
                    })
                    .await;
            })
        })
        .collect();
    for f in fills {
        let _ = f.await;
    }
    let fill_computes = computes.load(Ordering::Relaxed);
    let start = Instant::now().max(start);
    let end = start + Duration::from_millis(spec.duration_ms);
    let fail_from = start + Duration::from_millis(spec.fail_start_ms);
    let fail_to = fail_from + Duration::from_millis(spec.fail_ms);
    let mut tasks = Vec::with_capacity(args.tasks);
    for t in 0..args.tasks {
        let cache = cache.clone();
        let (computes, fail_computes) = (computes.clone(), fail_computes.clone());
        let spec = spec.clone();
        tasks.push(tokio::spawn(async move {
            let interval = Duration::from_micros(spec.interval_us);
            // Spread the tasks over one interval.
            tokio::time::sleep(interval * t as u32 / args.tasks.max(1) as u32).await;
            let mut lat = Vec::new();
            let (mut errors, mut served) = (0u64, 0u64);
            let mut i = t;
            let mut next = Instant::now();
            while Instant::now() < end {
                let key = format!("k{}", i % spec.keys);
                i += 1;
                let (c, fc) = (computes.clone(), fail_computes.clone());
                let sent = Instant::now();
                let in_window = failing && sent >= fail_from && sent < fail_to;
                let run = move || async move {
                    c.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    let fails = failing && now >= fail_from && now < fail_to;
                    if fails {
                        fc.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(compute).await;
                    if fails { Err(Failed) } else { Ok(1) }
                };
                let got: Result<u64, _> = if background {
                    cache.try_get_with_background(key.as_str(), run).await
                } else {
                    cache.try_get_with(key.as_str(), run).await
                };
                lat.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                match got {
                    Ok(_) if in_window => served += 1,
                    Ok(_) => {}
                    Err(_) => errors += 1,
                }
                next += interval;
                let now = Instant::now();
                if next > now {
                    tokio::time::sleep(next - now).await;
                } else {
                    next = now;
                }
            }
            (lat, errors, served)
        }));
    }
    let mut report = WorkerReport {
        lat_us: Vec::new(),
        computes: 0,
        fill_computes,
        errors: 0,
        fail_computes: 0,
        fail_served: 0,
    };
    for t in tasks {
        let (lat, errors, served) = t
            .await
            .map_err(|e| Fail::error(format!("refresh task: {e}")))?;
        report.lat_us.extend(lat);
        report.errors += errors;
        report.fail_served += served;
    }
    report.computes = computes.load(Ordering::Relaxed);
    report.fail_computes = fail_computes.load(Ordering::Relaxed);
    let _ = now_us();
    Ok(report)
}
