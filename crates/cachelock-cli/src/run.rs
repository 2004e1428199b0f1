//! `cachelock run`: run a command while holding a lock.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use cachelock::{CacheLock, LockOptions, Released};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, MissedTickBehavior};

use crate::common::{Fail, Global, parse_duration, show_duration};

/// Arguments of `cachelock run`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = crate::EXIT_CODES)]
pub struct RunArgs {
    /// Fail at once (with the conflict exit code) if the lock is held.
    #[arg(short = 'n', long, conflicts_with = "wait")]
    pub no_wait: bool,
    /// Wait at most this long for the lock (e.g. 10s, 2m), then fail with
    /// the conflict exit code. Default: wait forever.
    #[arg(short = 'w', long, value_name = "DURATION", value_parser = parse_duration)]
    pub wait: Option<Duration>,
    /// The lease: how long the lock outlives a cachelock that dies without
    /// releasing it. Renewed every third of it while CMD runs.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub lease: Duration,
    /// Exit code when the lock is held (-n) or the wait ran out (-w).
    #[arg(
        short = 'E',
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8)
    )]
    pub conflict_exit_code: u8,
    /// If the lock is lost while CMD runs, send it SIGTERM, then SIGKILL
    /// after --kill-grace. Without it, a warning is printed and CMD goes on.
    #[arg(long)]
    pub kill_on_loss: bool,
    /// With --kill-on-loss: time between SIGTERM and SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub kill_grace: Duration,
    /// Pause between attempts while waiting for the lock (plus up to 25%
    /// random jitter).
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub retry_interval: Duration,
    /// The lock's name (put under --namespace).
    pub key: String,
    /// The command and its arguments, after `--`. Run directly, not by a shell.
    #[arg(last = true, required = true, num_args = 1.., value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Runs the command under the lock and returns the exit code.
pub async fn run(global: &Global, args: RunArgs) -> Result<u8, Fail> {
    let key = global.cache_key(&args.key)?;
    let Some((program, program_args)) = args.command.split_first() else {
        return Err(Fail::error("no command given after --"));
    };
    let (_, backend) = global.connect_shared().await?;
    let lock = CacheLock::new(
        backend,
        key.clone(),
        LockOptions::new()
            .lease(args.lease)
            .retry_interval(args.retry_interval),
    )
    .map_err(Fail::error)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Fail::error)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(Fail::error)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(Fail::error)?;

    let acquire = async {
        match (args.no_wait, args.wait) {
            (true, _) => lock.try_acquire().await,
            (false, Some(d)) => lock.acquire_timeout(d).await,
            (false, None) => lock.acquire().await,
        }
    };
    let acquired = tokio::select! {
        r = acquire => r,
        _ = sigint.recv() => return Ok(128 + Signal::SIGINT as u8),
        _ = sigterm.recv() => return Ok(128 + Signal::SIGTERM as u8),
        _ = sighup.recv() => return Ok(128 + Signal::SIGHUP as u8),
    };
    let mut guard = match acquired {
        Ok(g) => g,
        Err(e) if e.is_held() => {
            eprintln!("cachelock: lock {key} is held by someone else");
            return Ok(args.conflict_exit_code);
        }
        Err(e) if e.is_timed_out() => {
            eprintln!(
                "cachelock: timed out after {} waiting for lock {key}",
                show_duration(args.wait.unwrap_or_default())
            );
            return Ok(args.conflict_exit_code);
        }
        Err(e) => return Err(Fail::error(format!("cannot take lock {key}: {e}"))),
    };

    let mut cmd = tokio::process::Command::new(program);
    cmd.args(program_args)
        .env("CACHELOCK_KEY", &key)
        .env("CACHELOCK_TOKEN", guard.token());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = guard.release().await;
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return Err(Fail {
                code,
                message: format!("cannot run {}: {e}", program.to_string_lossy()),
            });
        }
    };
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let send = |sig: Signal| {
        if let Some(pid) = pid {
            // The child may have just exited; it is not reaped yet, so the
            // pid cannot have been reused.
            let _ = nix::sys::signal::kill(pid, sig);
        }
    };

    let period = (args.lease / 3).max(Duration::from_millis(1));
    let mut renew = tokio::time::interval_at(Instant::now() + period, period);
    renew.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut lost = false;
    let mut kill_at: Option<Instant> = None;
    let mut warned_unavailable = false;

    let status: std::io::Result<ExitStatus> = loop {
        tokio::select! {
            st = child.wait() => break st,
            _ = renew.tick(), if !lost => {
                // Bounded, so a hung backend cannot stop us from seeing
                // the command end or forwarding a signal for long.
                let extended = tokio::time::timeout(period, guard.extend(None))
                    .await
                    .unwrap_or_else(|_| {
                        Err(cachelock::Error::Backend(cachelock::BackendError::TimedOut {
                            key: key.clone(),
                            after: period,
                        }))
                    });
                let why = match extended {
                    Ok(()) => {
                        if warned_unavailable {
                            eprintln!("cachelock: renewed the lease on {key} again");
                            warned_unavailable = false;
                        }
                        None
                    }
                    Err(e) if e.is_lease_expired() => Some("the key expired, was evicted or deleted".to_owned()),
                    Err(e) if guard.is_lost() => Some(format!("the lease ran out while renewing failed: {e}")),
                    Err(e) => {
                        eprintln!(
                            "cachelock: warning: could not renew the lease on {key} ({}); retrying, {} left",
                            crate::common::one_line(&e.to_string()),
                            show_duration(guard.remaining())
                        );
                        warned_unavailable = true;
                        None
                    }
                };
                if let Some(why) = why {
                    lost = true;
                    if args.kill_on_loss {
                        eprintln!("cachelock: lost the lock on {key} ({why}); sending SIGTERM to the command");
                        send(Signal::SIGTERM);
                        kill_at = Some(Instant::now() + args.kill_grace);
                    } else {
                        eprintln!(
                            "cachelock: lost the lock on {key} ({why}); another process may hold it now; \
                             the command keeps running"
                        );
                    }
                }
            }
            _ = sleep_until_opt(kill_at) => {
                eprintln!("cachelock: the command outlived --kill-grace; sending SIGKILL");
                send(Signal::SIGKILL);
                kill_at = None;
            }
            _ = sigint.recv() => send(Signal::SIGINT),
            _ = sigterm.recv() => send(Signal::SIGTERM),
            _ = sighup.recv() => send(Signal::SIGHUP),
        }
    };

    if lost {
        guard.forget();
    } else {
        match guard.release().await {
            Ok(Released::Released) => {}
            Ok(Released::Expired | Released::Lost) => {
                eprintln!("cachelock: the lock on {key} was lost before the command ended");
            }
            Err(e) => eprintln!(
                "cachelock: warning: could not release {key} ({}); it expires with its lease",
                crate::common::one_line(&e.to_string())
            ),
        }
    }

    let status = status.map_err(|e| Fail::error(format!("waiting for the command failed: {e}")))?;
    Ok(exit_code(status))
}

/// The command's exit code, or 128 + the signal that killed it.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(sig)) => u8::try_from((128 + sig) & 0xff).unwrap_or(1),
        (None, None) => 1,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
