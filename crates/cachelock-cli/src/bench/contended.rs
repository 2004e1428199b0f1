//! `bench contended`: P workers loop on one lock around a non-atomic
//! GET-then-SET of a counter; `violations` is acquisitions minus the final
//! counter, and with `--check` every critical section is stamped on
//! `CLOCK_MONOTONIC` and `overlaps` counts sections that began before
//! another ended.

use std::time::Duration;

use cachelock::{CacheLock, LockOptions, Released, SharedBackend};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::report::print;
use super::workers::{WorkerArgs, Workload, common_start, now_us, run_workers, sleep_until_us};
use super::{Output, progress, run_key};
use crate::common::{Connected, Fail, Global, parse_duration};

const COUNTER_TTL: Duration = Duration::from_secs(3600);

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

/// What `bench contended` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ContendedReport {
    pub workload: &'static str,
    pub backend: &'static str,
    pub lock: bool,
    pub procs: usize,
    pub seconds: f64,
    pub acquisitions: u64,
    pub acq_per_s: f64,
    pub violations: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlaps: Option<u64>,
    /// Critical sections (in the order they began) whose fence was not
    /// above the one before (`--check`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fence_regressions: Option<u64>,
    pub per_worker_min: u64,
    pub per_worker_max: u64,
}

/// What one worker reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    pub acquisitions: u64,
    pub end_us: u64,
    /// Critical sections as `[start, end]` on CLOCK_MONOTONIC (`--check`).
    pub intervals: Vec<[u64; 2]>,
    /// The fence of each of `intervals` (`--check`).
    #[serde(default)]
    pub fences: Vec<u64>,
}

/// Runs `bench contended`.
pub async fn run(global: &Global, args: ContendedArgs) -> Result<u8, Fail> {
    if args.procs == 0 {
        return Err(Fail::error("--procs must be at least 1"));
    }
    let Connected { url, backend, .. } = global.connect(None).await?;
    let key = run_key(global, "contended")?;
    let counter = format!("{key}:counter");
    backend
        .set(&counter, b"0", COUNTER_TTL)
        .await
        .map_err(|e| Fail::error(format!("cannot set up the counter: {e}")))?;
    let wargs = WorkerArgs {
        workload: Workload::Contended,
        key: key.clone(),
        counter: counter.clone(),
        start_us: common_start(args.procs),
        duration: args.duration,
        retry_interval: args.retry_interval,
        check: args.check,
        tasks: 1,
        no_lock: args.no_lock,
        spec: String::new(),
    };
    let bar = progress(args.procs as u64, &args.out, "workers done");
    let reports: Vec<WorkerReport> =
        run_workers(global, &url, &backend, args.procs, &wargs, &bar, worker).await?;
    bar.finish_and_clear();

    let acquisitions: u64 = reports.iter().map(|r| r.acquisitions).sum();
    let end_us = reports
        .iter()
        .map(|r| r.end_us)
        .max()
        .unwrap_or(wargs.start_us);
    let seconds = end_us.saturating_sub(wargs.start_us) as f64 / 1e6;
    let final_count = read_counter(&backend, &counter).await?;
    let _ = backend.delete(&counter).await;
    let overlaps = args.check.then(|| {
        count_overlaps(
            reports
                .iter()
                .flat_map(|r| r.intervals.iter().copied())
                .collect(),
        )
    });
    let fence_regressions = (args.check && !args.no_lock).then(|| {
        count_fence_regressions(
            reports
                .iter()
                .flat_map(|r| r.intervals.iter().zip(&r.fences).map(|(i, f)| (i[0], *f)))
                .collect(),
        )
    });
    print(
        args.out.json,
        &ContendedReport {
            workload: "contended",
            backend: url.kind(),
            lock: !args.no_lock,
            procs: args.procs,
            seconds,
            acquisitions,
            acq_per_s: (acquisitions as f64 / seconds.max(1e-9)).round(),
            violations: acquisitions.saturating_sub(final_count),
            overlaps,
            fence_regressions,
            per_worker_min: reports.iter().map(|r| r.acquisitions).min().unwrap_or(0),
            per_worker_max: reports.iter().map(|r| r.acquisitions).max().unwrap_or(0),
        },
    )?;
    Ok(0)
}

async fn read_counter(backend: &SharedBackend, counter: &str) -> Result<u64, Fail> {
    Ok(backend
        .get(counter)
        .await
        .map_err(|e| Fail::error(format!("cannot read the counter: {e}")))?
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
        .unwrap_or(0))
}

/// One worker: lock, GET-then-SET the counter, release, until the common
/// end.
pub async fn worker(backend: SharedBackend, args: WorkerArgs) -> Result<WorkerReport, Fail> {
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
    let mut fences: Vec<u64> = Vec::new();
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
        let fence = guard.as_ref().map_or(0, cachelock::LockGuard::fence);
        let n = read_counter(&backend, &args.counter).await?;
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
            fences.push(fence);
        }
    }
    Ok(WorkerReport {
        acquisitions,
        end_us: now_us(),
        intervals,
        fences,
    })
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

/// Counts critical sections, taken in the order they began, whose fence is
/// not above that of the section before.
pub fn count_fence_regressions(mut sections: Vec<(u64, u64)>) -> u64 {
    sections.sort_unstable();
    sections
        .windows(2)
        .filter(|w| matches!(w, [(_, a), (_, b)] if b <= a))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::{count_fence_regressions, count_overlaps};

    #[test]
    fn fence_regressions_are_counted() {
        assert_eq!(count_fence_regressions(vec![(1, 10), (3, 30), (2, 20)]), 0);
        assert_eq!(count_fence_regressions(vec![(1, 10), (2, 30), (3, 20)]), 1);
        assert_eq!(count_fence_regressions(vec![(1, 10), (2, 10)]), 1);
    }

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
