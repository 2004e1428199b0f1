//! `cachelock run`: run a command while holding a lock.

mod acquire;
mod child;
mod hold;

use std::ffi::OsString;
use std::time::Duration;

use cachelock::{CacheLock, LockOptions, Released};
use tokio::time::Instant;

use self::acquire::{Acquired, RESOLVE_LIMIT};
use self::child::{Signals, exit_code, signal_code};
use self::hold::{Limits, Stop, describe_loss};
use crate::common::{Fail, Global, NO_WAIT_BUSY_TIMEOUT, one_line, parse_duration, show_duration};

/// The default exit code for "the command ran, but the lock was lost".
pub const EXIT_LOST: u8 = 3;
/// The default exit code for "--max-hold stopped the command".
pub const EXIT_MAX_HOLD: u8 = 4;
/// The default exit code for "--timeout stopped the command" (as timeout(1)).
pub const EXIT_TIMEOUT: u8 = 124;

/// What to do when the backend cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnBackendError {
    /// Run the command WITHOUT the lock (gives up exclusion).
    Run,
    /// Do not run the command; exit 0.
    Skip,
    /// Do not run the command; exit with --error-exit-code.
    Fail,
}

/// Arguments of `cachelock run`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = crate::EXIT_CODES)]
pub struct RunArgs {
    /// Fail at once (with the conflict exit code) if the lock is held.
    #[arg(short = 'n', long, conflicts_with = "wait")]
    pub no_wait: bool,
    /// Wait at most this long for the lock (5 = 5 seconds, or 10s, 2m), then
    /// fail with the conflict exit code; 0 tries once. Default: wait forever.
    #[arg(short = 'w', long, value_name = "DURATION", value_parser = parse_duration)]
    pub wait: Option<Duration>,
    /// The lease: how long the lock outlives a cachelock that dies without
    /// releasing it. Renewed every third of it while CMD runs.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub lease: Duration,
    /// Pause between attempts while waiting for the lock (plus up to 25%
    /// random jitter).
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub retry_interval: Duration,
    /// If the lock is lost while CMD runs, or renewals fail so long that the
    /// lease is about to run out, stop CMD (SIGTERM, then SIGKILL after
    /// --kill-grace) before another process can get the lock. Without it, a
    /// warning is printed and CMD goes on.
    #[arg(long)]
    pub kill_on_loss: bool,
    /// Time between SIGTERM and SIGKILL when cachelock stops CMD (for a lease
    /// about to run out: at most a third of the lease).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub kill_grace: Duration,
    /// Stop CMD after this long (SIGTERM, then SIGKILL after --kill-grace)
    /// and exit with --timeout-exit-code, like timeout(1).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Hold the lock at most this long: then stop renewing it and stop CMD
    /// (SIGTERM, then SIGKILL after --kill-grace); exit with
    /// --max-hold-exit-code.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_hold: Option<Duration>,
    /// When the backend cannot be reached or fails before CMD started: fail,
    /// skip CMD (exit 0), or run CMD WITHOUT the lock (no exclusion at all).
    #[arg(long, value_name = "WHAT", value_enum, default_value_t = OnBackendError::Fail)]
    pub on_backend_error: OnBackendError,
    /// Exit code when the lock is held (-n) or the wait ran out (-w).
    #[arg(short = 'E', long, value_name = "N", default_value_t = 1)]
    pub conflict_exit_code: u8,
    /// Exit code when the backend fails (unreachable, timed out, ...).
    /// Usage errors always exit 2.
    #[arg(long, value_name = "N", default_value_t = crate::common::EXIT_ERROR)]
    pub error_exit_code: u8,
    /// Exit code when the lock was lost while CMD ran (also when
    /// --kill-on-loss stopped it).
    #[arg(long, value_name = "N", default_value_t = EXIT_LOST)]
    pub lost_exit_code: u8,
    /// After a lost lock, exit with CMD's own status instead of
    /// --lost-exit-code (stderr still says the lock was lost).
    #[arg(long, conflicts_with = "lost_exit_code")]
    pub no_lost_exit_code: bool,
    /// Exit code when --timeout stopped CMD.
    #[arg(long, value_name = "N", default_value_t = EXIT_TIMEOUT)]
    pub timeout_exit_code: u8,
    /// Exit code when --max-hold stopped CMD.
    #[arg(long, value_name = "N", default_value_t = EXIT_MAX_HOLD)]
    pub max_hold_exit_code: u8,
    /// Run this shell command line through `sh -c` (flock's -c) instead of
    /// CMD.
    #[arg(
        short = 'c',
        long = "command",
        value_name = "STRING",
        conflicts_with = "cmd"
    )]
    pub shell: Option<String>,
    /// The lock's name (put under --namespace).
    pub key: String,
    /// The command and its arguments, run directly (no shell). `--` before
    /// it is optional: everything after CMD's name is CMD's.
    #[arg(
        trailing_var_arg = true,
        required_unless_present = "shell",
        num_args = 1..,
        value_name = "CMD"
    )]
    pub cmd: Vec<OsString>,
}

/// Runs the command under the lock and returns the exit code.
pub async fn run(global: &Global, args: RunArgs) -> Result<u8, Fail> {
    let key = global.cache_key(&args.key)?;
    let (program, program_args) = match &args.shell {
        Some(line) => (
            OsString::from("sh"),
            vec![OsString::from("-c"), line.into()],
        ),
        None => match args.cmd.split_first() {
            Some((p, rest)) => (p.clone(), rest.to_vec()),
            None => return Err(Fail::error("no command given")),
        },
    };
    let shown = show_command(&program, &program_args);
    let options = LockOptions::new()
        .compat(global.compat())
        .lease(args.lease)
        .retry_interval(args.retry_interval)
        .holder_command(shown.clone());
    global.refuse_memory()?;
    let verbose = global.verbose > 0;
    let url = global.backend_url()?;
    let tls_ca = global.tls_ca_pem()?;
    let mut signals = Signals::catch()?;
    let busy = args.no_wait.then_some(NO_WAIT_BUSY_TIMEOUT);
    let connected = match global.open(url, tls_ca, busy).await {
        Ok(c) => c,
        Err(f) => return on_backend_error(&args, &f.message, &key, &program, &program_args).await,
    };
    let lock =
        CacheLock::new(connected.backend.clone(), key.clone(), options).map_err(Fail::error)?;
    say(verbose, format!("getting lock {key} on {}", connected.url));
    let (mut guard, waited) = match acquire::acquire(
        &lock,
        args.wait,
        args.no_wait,
        args.retry_interval,
        &mut signals,
    )
    .await
    {
        Acquired::Guard(g, waited) => (g, waited),
        Acquired::Conflict(message) => {
            eprintln!("cachelock: {message}");
            return Ok(args.conflict_exit_code);
        }
        Acquired::Signal(sig) => return Ok(signal_code(sig)),
        Acquired::Failed(e) => {
            let message = format!("cannot take lock {key}: {e}");
            // A key the backend refuses is the user's error, not the backend's.
            if matches!(
                e.as_backend(),
                Some(cachelock::BackendError::InvalidKey { .. }) | None
            ) {
                return Err(Fail::error(message));
            }
            return on_backend_error(&args, &message, &key, &program, &program_args).await;
        }
    };
    say(
        verbose,
        format!(
            "getting lock {key} took {} (lease {})",
            show_duration(waited),
            show_duration(args.lease)
        ),
    );

    let token = guard.token().to_owned();
    let fence = guard.fence().to_string();
    let mut child = match child::spawn(
        &program,
        &program_args,
        &[
            ("CACHELOCK_KEY", &key),
            ("CACHELOCK_TOKEN", &token),
            ("CACHELOCK_FENCE", &fence),
        ],
    ) {
        Ok(c) => c,
        Err(e) => {
            let _ = tokio::time::timeout(RESOLVE_LIMIT, guard.release()).await;
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
    say(verbose, format!("running {shown}"));
    let started = Instant::now();
    let limits = Limits {
        lease: args.lease,
        kill_on_loss: args.kill_on_loss,
        kill_grace: args.kill_grace,
        timeout: args.timeout,
        max_hold: args.max_hold,
    };
    let ended = hold::hold(
        &mut child,
        &mut guard,
        &connected.backend,
        connected.sqlite.as_ref(),
        &limits,
        &mut signals,
    )
    .await;
    let mut lost = ended.lost;
    if let Ok(st) = &ended.status {
        say(
            verbose,
            format!(
                "the command ended ({}) after {}",
                describe_status(*st),
                show_duration(started.elapsed())
            ),
        );
    }

    if lost.is_some() {
        guard.forget();
    } else {
        match tokio::time::timeout(RESOLVE_LIMIT, guard.release()).await {
            Ok(Ok(Released::Released)) => {
                say(
                    verbose,
                    format!(
                        "released lock {key} (held {})",
                        show_duration(started.elapsed())
                    ),
                );
            }
            Ok(Ok(Released::Expired | Released::Lost)) => {
                let why = describe_loss(&connected.backend, &key, &token).await;
                eprintln!("cachelock: the lock on {key} was lost before the command ended ({why})");
                lost = Some(why);
            }
            Ok(Err(e)) => eprintln!(
                "cachelock: warning: could not release {key} ({}); it expires with its lease",
                one_line(&e.to_string())
            ),
            Err(_) => eprintln!(
                "cachelock: warning: could not release {key} (no answer within {}); it expires with its lease",
                show_duration(RESOLVE_LIMIT)
            ),
        }
    }

    let status = ended
        .status
        .map_err(|e| Fail::error(format!("waiting for the command failed: {e}")))?;
    Ok(match (ended.stopped, lost) {
        (Some(Stop::SecondInterrupt), _) => signal_code(nix::sys::signal::Signal::SIGINT),
        (_, Some(_)) if !args.no_lost_exit_code => args.lost_exit_code,
        (Some(Stop::Timeout), _) => args.timeout_exit_code,
        (Some(Stop::MaxHold), _) => args.max_hold_exit_code,
        _ => exit_code(status),
    })
}

/// The backend failed before the command started: `--on-backend-error`.
async fn on_backend_error(
    run_args: &RunArgs,
    message: &str,
    key: &str,
    program: &OsString,
    args: &[OsString],
) -> Result<u8, Fail> {
    let message = one_line(message);
    match run_args.on_backend_error {
        OnBackendError::Fail => {
            return Err(Fail {
                code: run_args.error_exit_code,
                message,
            });
        }
        OnBackendError::Skip => {
            eprintln!("cachelock: {message}; skipping the command (--on-backend-error skip)");
            return Ok(0);
        }
        OnBackendError::Run => {}
    }
    eprintln!(
        "cachelock: {message}; running the command WITHOUT the lock (--on-backend-error run): \
         other processes are not excluded"
    );
    let mut child = child::spawn(
        program,
        args,
        &[
            ("CACHELOCK_KEY", key),
            ("CACHELOCK_TOKEN", ""),
            ("CACHELOCK_FENCE", ""),
        ],
    )
    .map_err(|e| Fail {
        code: if e.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        },
        message: format!("cannot run {}: {e}", program.to_string_lossy()),
    })?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(nix::unistd::Pid::from_raw);
    let mut signals = Signals::catch()?;
    loop {
        tokio::select! {
            st = child.wait() => {
                let st = st.map_err(|e| Fail::error(format!("waiting for the command failed: {e}")))?;
                return Ok(exit_code(st));
            }
            sig = signals.recv() => child::send(pid, sig),
        }
    }
}

/// Prints `cachelock: MESSAGE` on stderr with `-v`.
fn say(verbose: bool, message: String) {
    if verbose {
        eprintln!("cachelock: {message}");
    }
}

/// The command as a person would type it (arguments with spaces quoted).
fn show_command(program: &OsString, args: &[OsString]) -> String {
    std::iter::once(program)
        .chain(args)
        .map(|a| {
            let a = a.to_string_lossy();
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.into_owned()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn describe_status(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => match nix::sys::signal::Signal::try_from(s) {
            Ok(sig) => format!("killed by {sig}"),
            Err(_) => format!("killed by signal {s}"),
        },
        _ => "ended".to_owned(),
    }
}
