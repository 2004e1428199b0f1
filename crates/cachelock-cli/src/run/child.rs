//! Starting the command and talking to it: the parent-death signal, signals
//! to forward, exit codes.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

use crate::common::Fail;

/// Starts `program args` with the lock's key and token in its environment.
///
/// The command gets `SIGKILL` if `cachelock` dies (Linux
/// `PR_SET_PDEATHSIG`), so a `kill -9` of `cachelock` cannot leave it running
/// without the lock. The kernel sends that signal when the *thread* that
/// spawned the child exits; the CLI runs on a current-thread runtime, so
/// this is the main thread, which lives as long as the process.
pub fn spawn(
    program: &OsString,
    args: &[OsString],
    env: &[(&str, &str)],
) -> std::io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let parent = nix::unistd::getpid();
    // SAFETY: the hook runs in the child between fork and exec; it makes two
    // system calls (prctl, getppid) and builds an io::Error from an errno,
    // none of which allocates or takes a lock.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // cachelock may have died before the line above took effect: then
            // no signal will come, so do not start the command at all.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from(nix::errno::Errno::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Sends `sig` to the child `pid`, if it has one. The child may have just
/// exited; it is not reaped until `wait` returns, so the pid cannot have
/// been reused.
pub fn send(pid: Option<Pid>, sig: Signal) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(pid, sig);
    }
}

/// The command's exit code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(sig)) => u8::try_from((128 + sig) & 0xff).unwrap_or(1),
        (None, None) => 1,
    }
}

/// SIGINT, SIGTERM and SIGHUP sent to `cachelock`.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts catching the three signals.
    pub fn catch() -> Result<Self, Fail> {
        let on = |kind| signal(kind).map_err(|e| Fail::error(format!("cannot catch signals: {e}")));
        Ok(Self {
            int: on(SignalKind::interrupt())?,
            term: on(SignalKind::terminate())?,
            hup: on(SignalKind::hangup())?,
        })
    }

    /// The next signal.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a signal is never lost by dropping this future.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.int.recv() => Signal::SIGINT,
            _ = self.term.recv() => Signal::SIGTERM,
            _ = self.hup.recv() => Signal::SIGHUP,
        }
    }
}

/// `128 + sig`, the shell's code for "ended by signal `sig`".
pub fn signal_code(sig: Signal) -> u8 {
    u8::try_from(128 + sig as i32).unwrap_or(1)
}
