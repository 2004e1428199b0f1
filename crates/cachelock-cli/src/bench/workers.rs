//! Worker processes: the same binary re-run as `cachelock __bench-worker`,
//! started together at a wall-clock instant, each printing one JSON line.
//! With `memory://` (which cannot be shared between processes) the workers
//! are tasks in this process instead.

use std::future::Future;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cachelock::{BackendUrl, SharedBackend};
use indicatif::ProgressBar;
use serde::de::DeserializeOwned;

use crate::common::{Fail, Global, parse_duration};

/// The first argument that makes `cachelock` a benchmark worker.
pub const WORKER_ARG: &str = "__bench-worker";

/// Which workload a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Contended,
    Stampede,
    Refresh,
}

/// Arguments of a worker (the backend URL comes through the environment).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The workload.
    #[arg(long, value_enum)]
    pub workload: Workload,
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
    /// Refresh: the workload's settings, as JSON.
    #[arg(long, default_value = "")]
    pub spec: String,
}

impl WorkerArgs {
    /// The worker's command line (without the backend URL, which would be
    /// visible to every user in `ps`).
    fn argv(&self) -> Vec<String> {
        let workload = match self.workload {
            Workload::Contended => "contended",
            Workload::Stampede => "stampede",
            Workload::Refresh => "refresh",
        };
        let mut argv = vec![
            WORKER_ARG.to_owned(),
            "--workload".into(),
            workload.into(),
            "--key".into(),
            self.key.clone(),
            "--counter".into(),
            self.counter.clone(),
            "--start-us".into(),
            self.start_us.to_string(),
            "--duration".into(),
            format!("{}us", self.duration.as_micros()),
            "--retry-interval".into(),
            format!("{}us", self.retry_interval.as_micros()),
            "--tasks".into(),
            self.tasks.to_string(),
        ];
        if self.check {
            argv.push("--check".into());
        }
        if self.no_lock {
            argv.push("--no-lock".into());
        }
        if !self.spec.is_empty() {
            argv.push("--spec".into());
            argv.push(self.spec.clone());
        }
        argv
    }
}

/// Runs `procs` workers and collects their reports: processes, or, for
/// `memory://`, tasks running `in_process`.
pub async fn run_workers<T, F, Fut>(
    global: &Global,
    url: &BackendUrl,
    backend: &SharedBackend,
    procs: usize,
    args: &WorkerArgs,
    bar: &ProgressBar,
    in_process: F,
) -> Result<Vec<T>, Fail>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(SharedBackend, WorkerArgs) -> Fut,
    Fut: Future<Output = Result<T, Fail>> + Send + 'static,
{
    let mut reports = Vec::with_capacity(procs);
    if *url == BackendUrl::Memory {
        let tasks: Vec<_> = (0..procs)
            .map(|_| tokio::spawn(in_process(backend.clone(), args.clone())))
            .collect();
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
    let mut children = Vec::with_capacity(procs);
    for _ in 0..procs {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(args.argv())
            .env("CACHELOCK_BACKEND", worker_url(global, url))
            .env("CACHELOCK_NAMESPACE", global.namespace())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(ca) = &global.tls_ca {
            cmd.env("CACHELOCK_TLS_CA", ca);
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
        let report = serde_json::from_str(line)
            .map_err(|e| Fail::error(format!("bad worker report {line:?}: {e}")))?;
        bar.inc(1);
        reports.push(report);
    }
    Ok(reports)
}

/// The URL workers connect to: as given (not redacted), or the default file.
fn worker_url(global: &Global, url: &BackendUrl) -> String {
    match (global.backend.as_deref().map(str::trim), url) {
        (Some(given), _) if !given.is_empty() => given.to_owned(),
        (_, BackendUrl::Sqlite(p)) => format!("sqlite://{}", p.display()),
        (_, other) => other.to_string(),
    }
}

/// Microseconds since the Unix epoch.
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

/// When the workers start: late enough for all of them to be running.
pub fn common_start(procs: usize) -> u64 {
    let ms = 300 + 30 * u64::try_from(procs).unwrap_or(u64::MAX / 64);
    now_us() + ms * 1000
}
