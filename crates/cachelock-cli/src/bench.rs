//! `cachelock bench`: the benchmark harness.
//!
//! Multi-process workloads re-run this same binary as hidden
//! `__bench-worker` processes, which start together at a wall-clock instant
//! given by the parent and print one JSON line with their results. With
//! `memory://` (which cannot be shared between processes) the workers are
//! tasks in this process instead.

use std::io::IsTerminal;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cachelock::{BackendUrl, CacheLock, LockOptions, Released, SharedBackend};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::common::{Fail, Global, parse_duration};

/// The benchmark workloads.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCmd {
    /// One client, N times: non-blocking acquire + release on one key.
    Cycle(CycleArgs),
    /// P worker processes loop: blocking acquire, a non-atomic
    /// read-modify-write of a counter in the backend, release.
    Contended(ContendedArgs),
    /// P processes (T tasks each) call memoize on one cold key at once.
    Stampede(StampedeArgs),
}

/// Output options shared by the workloads.
#[derive(Debug, Clone, clap::Args)]
pub struct Output {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bench cycle`.
#[derive(Debug, clap::Args)]
pub struct CycleArgs {
    /// Number of acquire + release cycles.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub n: u64,
    #[command(flatten)]
    pub out: Output,
}

/// Arguments of `bench contended`.
#[derive(Debug, clap::Args)]
pub struct ContendedArgs {
    /// Number of worker processes.
    #[arg(long, default_value_t = 8)]
    pub procs: usize,
    /// How long the workers run.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Pause between attempts of a waiting worker (plus up to 25% jitter).
    #[arg(long, value_name = "DURATION", default_value = "1ms", value_parser = parse_duration)]
    pub retry_interval: Duration,
    /// Log every critical section on CLOCK_MONOTONIC and count overlapping
    /// ones (mutual-exclusion check).
    #[arg(long)]
    pub check: bool,
    /// Skip the lock (shows what the violation and overlap checks catch).
    #[arg(long)]
    pub no_lock: bool,
    #[command(flatten)]
    pub out: Output,
}

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

/// The first argument that makes `cachelock` a benchmark worker.
pub const WORKER_ARG: &str = "__bench-worker";

/// Arguments of the hidden worker process.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// `contended` or `stampede`.
    #[arg(long)]
    pub workload: String,
    /// Lock key (contended) or value key (stampede), already built.
    #[arg(long)]
    pub key: String,
    /// Counter key, already built.
    #[arg(long)]
    pub counter: String,
    /// Common start, in microseconds since the Unix epoch.
    #[arg(long)]
    pub start_us: u64,
    /// Contended: how long to run. Stampede: the compute time.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Duration,
    /// Contended: retry interval.
    #[arg(long, value_parser = parse_duration, default_value = "1ms")]
    pub retry_interval: Duration,
    /// Contended: log critical sections.
    #[arg(long)]
    pub check: bool,
    /// Stampede: tasks in this process.
    #[arg(long, default_value_t = 1)]
    pub tasks: usize,
    /// Stampede: memoize without the lock.
    #[arg(long)]
    pub no_lock: bool,
}

/// Runs one benchmark.
pub async fn bench(global: &Global, cmd: BenchCmd) -> Result<u8, Fail> {
    match cmd {
        BenchCmd::Cycle(a) => cycle(global, a).await,
        BenchCmd::Contended(a) => contended(global, a).await,
        BenchCmd::Stampede(a) => stampede(global, a).await,
    }
}

/// A key for this run only.
fn run_key(global: &Global, what: &str) -> Result<String, Fail> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    global.cache_key(&format!("bench:{what}:{}:{nanos}", std::process::id()))
}

fn bench_err(what: &str) -> impl Fn(cachelock::Error) -> Fail + '_ {
    move |e| Fail::error(format!("{what}: {e}"))
}

fn progress(len: u64, out: &Output, unit: &str) -> ProgressBar {
    if out.json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(&format!(
        "{{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {unit}"
    ));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar
}

/// The order of the table's columns.
const COLUMNS: &[&str] = &[
    "workload",
    "backend",
    "lock",
    "procs",
    "tasks",
    "cycles",
    "compute_s",
    "seconds",
    "cycles_per_s",
    "p50_us",
    "acquisitions",
    "acq_per_s",
    "violations",
    "overlaps",
    "per_worker_min",
    "per_worker_max",
    "computes",
    "p50_s",
    "max_s",
];

/// Prints the results: a two-row table, or one JSON line.
fn report(out: &Output, obj: &Value) {
    if out.json {
        println!("{obj}");
        return;
    }
    let Some(map) = obj.as_object() else {
        return;
    };
    // Table columns in a readable order (JSON objects are sorted by key).
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by_key(|k| COLUMNS.iter().position(|c| c == k).unwrap_or(COLUMNS.len()));
    let cells: Vec<(String, String)> = keys
        .into_iter()
        .filter_map(|k| Some((k, map.get(k)?)))
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => match n.as_f64() {
                    Some(f) if n.is_f64() && f.fract() == 0.0 => format!("{f:.0}"),
                    Some(f) if n.is_f64() => format!("{f:.3}"),
                    _ => n.to_string(),
                },
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect();
    let widths: Vec<usize> = cells.iter().map(|(k, v)| k.len().max(v.len())).collect();
    let line = |f: &dyn Fn(&(String, String)) -> &str| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{:<w$}", f(c), w = *w))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(&|c| &c.0).trim_end());
    println!("{}", line(&|c| &c.1).trim_end());
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `bench cycle`.
async fn cycle(global: &Global, args: CycleArgs) -> Result<u8, Fail> {
    if args.n == 0 {
        return Err(Fail::error("-n must be at least 1"));
    }
    let crate::common::Connected { url, backend, .. } = global.connect(None).await?;
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
        let guard = lock.try_acquire().await.map_err(bench_err("acquire"))?;
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
    let n = args.n as f64;
    report(
        &args.out,
        &json!({
            "workload": "cycle",
            "backend": url.kind(),
            "cycles": args.n,
            "seconds": seconds,
            "cycles_per_s": (n / seconds).round(),
            "p50_us": (median(lat) * 1e7).round() / 10.0,
        }),
    );
    Ok(0)
}

/// The URL workers connect to: as given (not redacted), or the default file.
fn worker_backend(global: &Global, url: &BackendUrl) -> String {
    match (&global.backend, url) {
        (Some(given), _) => given.clone(),
        (None, BackendUrl::Sqlite(p)) => format!("sqlite://{}", p.display()),
        (None, other) => other.to_string(),
    }
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Sleeps until `start_us` on the wall clock.
pub async fn sleep_until_us(start_us: u64) {
    let now = now_us();
    if start_us > now {
        tokio::time::sleep(Duration::from_micros(start_us - now)).await;
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for all processes on the host.
fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec())
                .unwrap_or(0)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
        })
        .unwrap_or(0)
}

/// Runs `procs` workers (processes, or tasks for `memory://`) and collects
/// their JSON reports.
async fn run_workers(
    global: &Global,
    url: &BackendUrl,
    backend: &SharedBackend,
    procs: usize,
    args: &WorkerArgs,
    bar: &ProgressBar,
) -> Result<Vec<Value>, Fail> {
    let mut reports = Vec::with_capacity(procs);
    if *url == BackendUrl::Memory {
        let mut tasks = Vec::new();
        for _ in 0..procs {
            let (b, a) = (backend.clone(), clone_worker_args(args));
            tasks.push(tokio::spawn(async move { work(b, &a).await }));
        }
        for t in tasks {
            let r = t
                .await
                .map_err(|e| Fail::error(format!("worker task: {e}")))??;
            bar.inc(1);
            reports.push(r);
        }
        return Ok(reports);
    }
    let exe = std::env::current_exe()
        .map_err(|e| Fail::error(format!("cannot find this program to run workers: {e}")))?;
    let mut children = Vec::new();
    for _ in 0..procs {
        let mut cmd = tokio::process::Command::new(&exe);
        // The URL (password included) goes through the environment: argv is
        // visible to every user in `ps`.
        cmd.env("CACHELOCK_BACKEND", worker_backend(global, url))
            .env("CACHELOCK_NAMESPACE", &global.namespace)
            .arg(WORKER_ARG)
            .arg("--workload")
            .arg(&args.workload)
            .arg("--key")
            .arg(&args.key)
            .arg("--counter")
            .arg(&args.counter)
            .arg("--start-us")
            .arg(args.start_us.to_string())
            .arg("--duration")
            .arg(format!("{}us", args.duration.as_micros()))
            .arg("--retry-interval")
            .arg(format!("{}us", args.retry_interval.as_micros()))
            .arg("--tasks")
            .arg(args.tasks.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(ca) = &global.tls_ca {
            cmd.env("CACHELOCK_TLS_CA", ca);
        }
        if args.check {
            cmd.arg("--check");
        }
        if args.no_lock {
            cmd.arg("--no-lock");
        }
        children.push(
            cmd.spawn()
                .map_err(|e| Fail::error(format!("cannot start a worker process: {e}")))?,
        );
    }
    for child in children {
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| Fail::error(format!("worker process: {e}")))?;
        if !out.status.success() {
            return Err(Fail::error(format!(
                "a worker process failed ({}); see its message above",
                out.status
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Fail::error(format!("bad worker report {line:?}: {e}")))?;
        bar.inc(1);
        reports.push(v);
    }
    Ok(reports)
}

fn clone_worker_args(a: &WorkerArgs) -> WorkerArgs {
    WorkerArgs {
        workload: a.workload.clone(),
        key: a.key.clone(),
        counter: a.counter.clone(),
        start_us: a.start_us,
        duration: a.duration,
        retry_interval: a.retry_interval,
        check: a.check,
        tasks: a.tasks,
        no_lock: a.no_lock,
    }
}

/// The hidden worker subcommand: runs one worker, prints its JSON report.
pub async fn worker(global: &Global, args: WorkerArgs) -> Result<u8, Fail> {
    let backend = global.connect(None).await?.backend;
    let report = work(backend, &args).await?;
    println!("{report}");
    Ok(0)
}

async fn work(backend: SharedBackend, args: &WorkerArgs) -> Result<Value, Fail> {
    match args.workload.as_str() {
        "contended" => contended_worker(backend, args).await,
        "stampede" => crate::stampede::stampede_worker(backend, args).await,
        other => Err(Fail::error(format!("unknown workload {other:?}"))),
    }
}

const COUNTER_TTL: Duration = Duration::from_secs(3600);

async fn contended_worker(backend: SharedBackend, args: &WorkerArgs) -> Result<Value, Fail> {
    let lock = CacheLock::new(
        backend.clone(),
        args.key.clone(),
        LockOptions::new()
            .lease(Duration::from_secs(10))
            .retry_interval(args.retry_interval),
    )
    .map_err(Fail::error)?;
    sleep_until_us(args.start_us).await;
    // The run ends at the common start + duration for every worker.
    let late = Duration::from_micros(now_us().saturating_sub(args.start_us));
    let deadline = Instant::now() + args.duration.saturating_sub(late);
    let mut acquisitions: u64 = 0;
    let mut intervals: Vec<[u64; 2]> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let guard = if args.no_lock {
            None
        } else {
            match lock.acquire_timeout(left).await {
                Ok(g) => Some(g),
                Err(e) if e.is_timed_out() => break,
                Err(e) => return Err(Fail::error(format!("acquire: {e}"))),
            }
        };
        let t0 = mono_ns();
        let cur = backend
            .get(&args.counter)
            .await
            .map_err(|e| Fail::error(format!("read counter: {e}")))?;
        let n: u64 = cur
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
            .unwrap_or(0);
        // Let other workers run here, as a network round trip would (with
        // memory:// the workers are tasks on one thread).
        tokio::task::yield_now().await;
        backend
            .set(&args.counter, (n + 1).to_string().as_bytes(), COUNTER_TTL)
            .await
            .map_err(|e| Fail::error(format!("write counter: {e}")))?;
        let t1 = mono_ns();
        if let Some(guard) = guard {
            let released = guard
                .release()
                .await
                .map_err(|e| Fail::error(format!("release: {e}")))?;
            if released != Released::Released {
                return Err(Fail::error(format!(
                    "the lock was lost before release ({released:?})"
                )));
            }
        }
        acquisitions += 1;
        tokio::task::yield_now().await;
        if args.check {
            intervals.push([t0, t1]);
        }
    }
    Ok(json!({ "acquisitions": acquisitions, "end_us": now_us(), "intervals": intervals }))
}

/// Counts critical sections that began before an earlier one ended.
pub fn count_overlaps(mut intervals: Vec<[u64; 2]>) -> u64 {
    intervals.sort_unstable();
    let mut overlaps = 0;
    let mut max_end = 0;
    for [start, end] in intervals {
        if start < max_end {
            overlaps += 1;
        }
        max_end = max_end.max(end);
    }
    overlaps
}

/// When the workers start: late enough for all of them to be running.
fn common_start(procs: usize) -> u64 {
    let ms = 300 + 30 * u64::try_from(procs).unwrap_or(u64::MAX / 64);
    now_us() + ms * 1000
}

/// `bench contended`.
async fn contended(global: &Global, args: ContendedArgs) -> Result<u8, Fail> {
    if args.procs == 0 {
        return Err(Fail::error("--procs must be at least 1"));
    }
    let crate::common::Connected { url, backend, .. } = global.connect(None).await?;
    let key = run_key(global, "contended")?;
    let counter = format!("{key}:counter");
    backend
        .set(&counter, b"0", COUNTER_TTL)
        .await
        .map_err(|e| Fail::error(format!("cannot set up the counter: {e}")))?;
    let wargs = WorkerArgs {
        workload: "contended".into(),
        key: key.clone(),
        counter: counter.clone(),
        start_us: common_start(args.procs),
        duration: args.duration,
        retry_interval: args.retry_interval,
        check: args.check,
        tasks: 1,
        no_lock: args.no_lock,
    };
    let bar = progress(args.procs as u64, &args.out, "workers done");
    let reports = run_workers(global, &url, &backend, args.procs, &wargs, &bar).await?;
    bar.finish_and_clear();

    let per: Vec<u64> = reports
        .iter()
        .map(|r| r["acquisitions"].as_u64().unwrap_or(0))
        .collect();
    let acquisitions: u64 = per.iter().sum();
    let end_us = reports
        .iter()
        .filter_map(|r| r["end_us"].as_u64())
        .max()
        .unwrap_or(wargs.start_us);
    let seconds = end_us.saturating_sub(wargs.start_us) as f64 / 1e6;
    let final_count: u64 = backend
        .get(&counter)
        .await
        .map_err(|e| Fail::error(format!("cannot read the counter: {e}")))?
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
        .unwrap_or(0);
    let _ = backend.delete(&counter).await;
    let mut obj = json!({
        "workload": "contended",
        "backend": url.kind(),
        "lock": !args.no_lock,
        "procs": args.procs,
        "seconds": seconds,
        "acquisitions": acquisitions,
        "acq_per_s": (acquisitions as f64 / seconds.max(1e-9)).round(),
        "violations": acquisitions.saturating_sub(final_count),
        "per_worker_min": per.iter().min().copied().unwrap_or(0),
        "per_worker_max": per.iter().max().copied().unwrap_or(0),
    });
    if args.check {
        let all: Vec<[u64; 2]> = reports
            .iter()
            .filter_map(|r| r["intervals"].as_array())
            .flatten()
            .filter_map(|iv| Some([iv.get(0)?.as_u64()?, iv.get(1)?.as_u64()?]))
            .collect();
        obj["overlaps"] = json!(count_overlaps(all));
    }
    report(&args.out, &obj);
    Ok(0)
}

/// `bench stampede`.
async fn stampede(global: &Global, args: StampedeArgs) -> Result<u8, Fail> {
    if args.procs == 0 || args.tasks == 0 {
        return Err(Fail::error("--procs and --tasks must be at least 1"));
    }
    let crate::common::Connected { url, backend, .. } = global.connect(None).await?;
    let key = run_key(global, "stampede")?;
    let counter = format!("{key}:computes");
    let wargs = WorkerArgs {
        workload: "stampede".into(),
        key: key.clone(),
        counter: counter.clone(),
        start_us: common_start(args.procs),
        duration: args.compute,
        retry_interval: Duration::from_millis(1),
        check: false,
        tasks: args.tasks,
        no_lock: args.no_lock,
    };
    let bar = progress(args.procs as u64, &args.out, "workers done");
    let reports = run_workers(global, &url, &backend, args.procs, &wargs, &bar).await?;
    bar.finish_and_clear();
    let times: Vec<f64> = reports
        .iter()
        .filter_map(|r| r["times_s"].as_array())
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    let computes: u64 = backend
        .get(&counter)
        .await
        .map_err(|e| Fail::error(format!("cannot read the counter: {e}")))?
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
        .unwrap_or(0);
    let _ = backend.delete(&counter).await;
    let max = times.iter().copied().fold(0.0, f64::max);
    report(
        &args.out,
        &json!({
            "workload": "stampede",
            "backend": url.kind(),
            "lock": !args.no_lock,
            "procs": args.procs,
            "tasks": args.tasks,
            "compute_s": args.compute.as_secs_f64(),
            "computes": computes,
            "p50_s": median(times),
            "max_s": max,
        }),
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::count_overlaps;

    #[test]
    fn overlaps_are_counted() {
        assert_eq!(count_overlaps(vec![]), 0);
        assert_eq!(count_overlaps(vec![[0, 10], [10, 20], [25, 30]]), 0);
        assert_eq!(count_overlaps(vec![[10, 20], [0, 11]]), 1);
        // Nested inside a long one, and out of order.
        assert_eq!(
            count_overlaps(vec![[5, 6], [0, 100], [50, 60], [100, 101]]),
            2
        );
    }
}
