//! Holding the lock while the command runs: renewals, the lease deadline,
//! `--timeout`, `--max-hold`, signals.

use std::process::ExitStatus;
use std::time::Duration;

use cachelock::{LockGuard, SharedBackend};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::time::Instant;

use super::child::{Signals, send};
use crate::common::{FileId, one_line, show_duration};

/// What the command may not outlast, and what to do then.
pub struct Limits {
    pub lease: Duration,
    pub kill_on_loss: bool,
    pub kill_grace: Duration,
    pub timeout: Option<Duration>,
    pub max_hold: Option<Duration>,
}

/// Why `cachelock` stopped the command itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Timeout,
    MaxHold,
    SecondInterrupt,
}

/// How the command ended.
pub struct Ended {
    pub status: std::io::Result<ExitStatus>,
    /// Set if the lock was lost (or given up because it was about to be)
    /// while the command ran: why, in words.
    pub lost: Option<String>,
    pub stopped: Option<Stop>,
}

enum Event {
    Exited(std::io::Result<ExitStatus>),
    Renewed(Result<(), cachelock::Error>),
    RenewTimedOut,
    Time,
    Signal(Signal),
}

/// Runs until the command ends, renewing the lease every third of it.
///
/// If a renewal finds the key gone or another token in it, or the SQLite
/// file was deleted or replaced, the lock is lost. If renewals keep
/// failing, the lease would run out by the local clock: with
/// `--kill-on-loss` the command gets SIGTERM when less than the kill grace
/// (at most a third of the lease) plus a safety margin is left, and SIGKILL
/// when only the margin is left, so it has stopped before the lease can
/// run out on the server; without it, the loss is reported at the deadline.
pub async fn hold(
    child: &mut tokio::process::Child,
    guard: &mut LockGuard,
    backend: &SharedBackend,
    sqlite: Option<&FileId>,
    limits: &Limits,
    signals: &mut Signals,
) -> Ended {
    let key = guard.key().to_owned();
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let lease = limits.lease;
    let period = (lease / 3).max(Duration::from_millis(1));
    let fast_retry = (lease / 15).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let margin = (lease / 10)
        .clamp(Duration::from_millis(100), Duration::from_secs(2))
        .min(lease / 2);
    let loss_grace = limits.kill_grace.min(lease / 3);
    let start = Instant::now();

    let mut deadline = guard.deadline();
    let mut renew_at = Some(start + period);
    let mut lost: Option<String> = None;
    let mut stopped = None;
    let mut kill_at: Option<Instant> = None;
    let mut timeout_at = limits.timeout.map(|d| start + d);
    let mut max_hold_at = limits.max_hold.map(|d| start + d);
    let mut interrupts = 0u32;
    let mut warned = false;

    loop {
        let now = Instant::now();
        // The next moment something is due by the clock.
        let mut next: Vec<Instant> = [kill_at, timeout_at, max_hold_at]
            .into_iter()
            .flatten()
            .collect();
        if lost.is_none() {
            next.push(deadline);
            if limits.kill_on_loss {
                next.push(deadline.checked_sub(margin + loss_grace).unwrap_or(now));
            }
        }
        let renew_due = lost.is_none() && renew_at.is_some_and(|t| t <= now);
        if let Some(t) = renew_at.filter(|_| !renew_due && lost.is_none()) {
            next.push(t);
        }
        let wake = next.into_iter().min();

        let event = if renew_due {
            if sqlite.is_some_and(|f| !f.still_there()) {
                let path = sqlite
                    .map(|f| f.path.display().to_string())
                    .unwrap_or_default();
                lost = Some(format!("the SQLite file {path} was deleted or replaced"));
                report_loss(
                    child,
                    &key,
                    lost.as_deref(),
                    limits,
                    pid,
                    &mut kill_at,
                    None,
                );
                continue;
            }
            tokio::select! {
                r = tokio::time::timeout(period, guard.extend(None)) => match r {
                    Ok(r) => Event::Renewed(r),
                    Err(_) => Event::RenewTimedOut,
                },
                st = child.wait() => Event::Exited(st),
                () = sleep_until_opt(wake) => Event::Time,
                sig = signals.recv() => Event::Signal(sig),
            }
        } else {
            tokio::select! {
                st = child.wait() => Event::Exited(st),
                () = sleep_until_opt(wake) => Event::Time,
                sig = signals.recv() => Event::Signal(sig),
            }
        };

        match event {
            Event::Exited(status) => {
                return Ended {
                    status,
                    lost,
                    stopped,
                };
            }
            Event::Renewed(Ok(())) => {
                deadline = guard.deadline();
                renew_at = Some(Instant::now() + period);
                if warned {
                    eprintln!("cachelock: renewed the lease on {key} again");
                    warned = false;
                }
            }
            Event::Renewed(Err(e)) if e.is_lease_expired() => {
                let why = describe_loss(backend, &key, guard.token()).await;
                lost = Some(why);
                report_loss(
                    child,
                    &key,
                    lost.as_deref(),
                    limits,
                    pid,
                    &mut kill_at,
                    None,
                );
            }
            Event::Renewed(Err(e)) => {
                renew_failed(&key, &one_line(&e.to_string()), deadline, &mut warned);
                renew_at = Some(Instant::now() + fast_retry);
            }
            Event::RenewTimedOut => {
                let why = format!("no answer within {}", show_duration(period));
                renew_failed(&key, &why, deadline, &mut warned);
                renew_at = Some(Instant::now() + fast_retry);
            }
            Event::Signal(Signal::SIGINT) => {
                interrupts += 1;
                if interrupts >= 2 {
                    eprintln!("cachelock: interrupted again; sending SIGKILL to the command");
                    send(pid, Signal::SIGKILL);
                    stopped = Some(Stop::SecondInterrupt);
                } else {
                    send(pid, Signal::SIGINT);
                }
            }
            Event::Signal(sig) => send(pid, sig),
            Event::Time => {}
        }

        // What the clock says now.
        let now = Instant::now();
        if kill_at.is_some_and(|t| t <= now) {
            eprintln!("cachelock: the command is still running; sending SIGKILL");
            send(pid, Signal::SIGKILL);
            kill_at = None;
        }
        if timeout_at.is_some_and(|t| t <= now) {
            timeout_at = None;
            stopped.get_or_insert(Stop::Timeout);
            eprintln!(
                "cachelock: the command ran past --timeout {}; sending SIGTERM",
                show_duration(limits.timeout.unwrap_or_default())
            );
            terminate(pid, limits.kill_grace, &mut kill_at);
        }
        if max_hold_at.is_some_and(|t| t <= now) {
            max_hold_at = None;
            renew_at = None;
            stopped.get_or_insert(Stop::MaxHold);
            eprintln!(
                "cachelock: held the lock for --max-hold {}; renewing no more and sending SIGTERM to the command",
                show_duration(limits.max_hold.unwrap_or_default())
            );
            terminate(pid, limits.kill_grace, &mut kill_at);
        }
        if lost.is_none() {
            if now >= deadline {
                lost = Some(if renew_at.is_none() {
                    "its lease ran out (no renewals after --max-hold)".to_owned()
                } else {
                    "its lease ran out while renewals failed".to_owned()
                });
                report_loss(
                    child,
                    &key,
                    lost.as_deref(),
                    limits,
                    pid,
                    &mut kill_at,
                    None,
                );
            } else if limits.kill_on_loss
                && deadline
                    .checked_sub(margin + loss_grace)
                    .is_none_or(|t| t <= now)
            {
                let left = deadline.saturating_duration_since(now);
                lost = Some(format!(
                    "renewals failed and its lease runs out in {}",
                    show_duration(left)
                ));
                let hard = deadline.checked_sub(margin).unwrap_or(now);
                report_loss(
                    child,
                    &key,
                    lost.as_deref(),
                    limits,
                    pid,
                    &mut kill_at,
                    Some(hard),
                );
            }
        }
    }
}

fn renew_failed(key: &str, why: &str, deadline: Instant, warned: &mut bool) {
    let left = deadline.saturating_duration_since(Instant::now());
    eprintln!(
        "cachelock: warning: could not renew the lease on {key} ({why}); retrying, {} left",
        show_duration(left)
    );
    *warned = true;
}

/// SIGTERM now, SIGKILL after `grace` (or earlier if already planned).
fn terminate(pid: Option<Pid>, grace: Duration, kill_at: &mut Option<Instant>) {
    send(pid, Signal::SIGTERM);
    let at = Instant::now() + grace;
    *kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
}

/// Says that the lock was lost, and with `--kill-on-loss` stops the command
/// (SIGKILL at `hard` at the latest, else after the kill grace).
fn report_loss(
    child: &mut tokio::process::Child,
    key: &str,
    why: Option<&str>,
    limits: &Limits,
    pid: Option<Pid>,
    kill_at: &mut Option<Instant>,
    hard: Option<Instant>,
) {
    let why = why.unwrap_or("unknown");
    let running = matches!(child.try_wait(), Ok(None));
    if !running {
        eprintln!("cachelock: lost the lock on {key} ({why}) as the command ended");
    } else if limits.kill_on_loss {
        eprintln!("cachelock: lost the lock on {key} ({why}); sending SIGTERM to the command");
        terminate(pid, limits.kill_grace, kill_at);
        if let Some(hard) = hard {
            *kill_at = Some(kill_at.map_or(hard, |k| k.min(hard)));
        }
    } else {
        eprintln!(
            "cachelock: lost the lock on {key} ({why}); another process may hold it now; \
             the command keeps running"
        );
    }
}

/// Tells "someone else holds it now" from "it is gone".
pub async fn describe_loss(backend: &SharedBackend, key: &str, token: &str) -> String {
    match tokio::time::timeout(Duration::from_secs(1), backend.get(key)).await {
        Ok(Ok(Some(v))) if v.as_ref() != token.as_bytes() => {
            "it is held by another token now".to_owned()
        }
        Ok(Ok(_)) => "the key expired, was evicted or deleted".to_owned(),
        _ => "the key expired, was evicted, deleted or taken by another token".to_owned(),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
