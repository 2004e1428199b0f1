//! `cachelock bench`: the benchmark harness, one file per workload.
//!
//! * [`cycle`]: one client, acquire + release;
//! * [`contended`]: worker processes loop on one lock around a non-atomic
//!   read-modify-write;
//! * [`stampede`]: worker processes call memoize on one cold key at once;
//! * [`handoff`]: two clients pass one lock back and forth: release to the
//!   queued waiter's acquire.
//!
//! [`workers`] starts the worker processes and collects their reports;
//! [`report`] prints a workload's report struct as JSON or a table.

mod contended;
mod cycle;
mod handoff;
mod report;
mod stampede;
mod workers;

use std::io::IsTerminal;
use std::time::{SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};

use self::workers::Workload;
pub use self::workers::{WORKER_ARG, WorkerArgs};
use crate::common::{Fail, Global};

/// The benchmark workloads.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCmd {
    /// One client, N times: non-blocking acquire + release on one key.
    Cycle(cycle::CycleArgs),
    /// P worker processes loop: blocking acquire, a non-atomic
    /// read-modify-write of a counter in the backend, release.
    Contended(contended::ContendedArgs),
    /// P processes (T tasks each) call memoize on one cold key at once.
    Stampede(stampede::StampedeArgs),
    /// Two clients pass one lock back and forth: the time from a release to
    /// the queued waiter's acquire, p50 and p99.
    Handoff(handoff::HandoffArgs),
}

/// Output options shared by the workloads.
#[derive(Debug, Clone, clap::Args)]
pub struct Output {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs one benchmark.
pub async fn bench(global: &Global, cmd: BenchCmd) -> Result<u8, Fail> {
    match cmd {
        BenchCmd::Cycle(a) => cycle::run(global, a).await,
        BenchCmd::Contended(a) => contended::run(global, a).await,
        BenchCmd::Stampede(a) => stampede::run(global, a).await,
        BenchCmd::Handoff(a) => handoff::run(global, a).await,
    }
}

/// The hidden worker process: runs one worker, prints its JSON report.
pub async fn worker(global: &Global, args: WorkerArgs) -> Result<u8, Fail> {
    let backend = global.connect(None).await?.backend;
    let line = match args.workload {
        Workload::Contended => serde_json::to_string(&contended::worker(backend, args).await?),
        Workload::Stampede => serde_json::to_string(&stampede::worker(backend, args).await?),
    }
    .map_err(|e| Fail::error(format!("cannot write the worker report: {e}")))?;
    println!("{line}");
    Ok(0)
}

/// A key for this run only.
fn run_key(global: &Global, what: &str) -> Result<String, Fail> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    global.cache_key(&format!("bench:{what}:{}:{nanos}", std::process::id()))
}

/// A progress bar on a terminal, hidden otherwise or with `--json`.
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
