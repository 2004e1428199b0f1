//! The `cachelock` command: run a command under a distributed lock kept in a
//! cache, inspect and force-release locks, and benchmark backends.
//!
//! See `cachelock --help` and the README for usage and exit codes.

mod admin;
mod bench;
mod common;
mod run;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::common::{Fail, Global};

/// Exit codes, shown at the end of `--help` and in the man page.
const EXIT_CODES: &str = "\
Exit codes (run), each but 2 settable by an option:
  N        the command's own exit code
  128+S    the command was killed by signal S (e.g. 143 for SIGTERM)
  1        the lock was held (-n) or -w ran out; the command did not run (-E/--conflict-exit-code)
  2        usage error or bad backend URL; also a backend that cannot be reached or fails before
           the command runs (--error-exit-code; see --on-backend-error)
  3        the command ran, but the lock was lost while it ran (--lost-exit-code, or
           --no-lost-exit-code for the command's own code); also when --kill-on-loss stopped it
  4        --max-hold stopped the command (--max-hold-exit-code)
  124      --timeout stopped the command, as timeout(1) (--timeout-exit-code)
  126/127  the command could not be started / was not found
  130      a second Ctrl-C (SIGINT) killed the command
Exit codes (status): 0 held, 1 free, 2 error.  (release): 0 released, 1 nothing to release, 2 error.
Exit codes (list): 0 listed (even if none is held), 2 error, 3 the backend cannot list (Memcached).

Durations: 5 (seconds, like flock), 0.5, 30s, 2m 30s, 250ms; at most 30 days.
If cachelock is killed (even kill -9), the kernel sends the command SIGKILL (Linux PR_SET_PDEATHSIG).

Backend URLs (--backend or CACHELOCK_BACKEND; empty means the default):
  sqlite:///path/file.sqlite3   embedded, shared by all processes on this machine (the default:
                                $XDG_CACHE_HOME/cachelock/locks.sqlite3, i.e. ~/.cache/...)
  redis://host:port[/db]  rediss://... (--tls-ca FILE for a private CA)  redis+unix:///socket
  redis+cluster://h1:p1,h2:p2   memcached://h1:p1,h2:p2   memory://   (in-process; bench only)
  redis+sentinel://[user:pass@]h1:p1,h2:p2/service[/db]   (the master, found through Redis Sentinel;
                                a failover can lose a lock: it is then reported lost, exit 3)

Keys: KEY is put under the namespace (--namespace, default \"cachelock\"): the lock lives in the
cache under \"cachelock:KEY\". Use --namespace '' to use KEY as the full cache key.
With --django (CACHELOCK_COMPAT=django), locks are shared with djblets' CacheLock on a Django cache:
the key is Django's \":1:KEY\" (--django-prefix, --django-version; --namespace is djblets' site
part, default none) and the token is stored as Django stores a str (pickled on Redis, text with
flags 16 on Memcached).";

/// How long `cachelock` may wait, after its work is done, for clean-ups it
/// started (removing the token of an add whose answer was lost) before it
/// exits.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Run a command under a distributed lock kept in a cache (Redis, Memcached
/// or an embedded SQLite file), inspect locks, and benchmark backends.
#[derive(Debug, Parser)]
#[command(name = "cachelock", version, after_long_help = EXIT_CODES, after_help = "See --help for exit codes and backend URLs.")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run CMD while holding the lock KEY (like flock(1), across machines).
    Run(run::RunArgs),
    /// Show whether KEY is held, by which token, and for how long.
    Status(admin::StatusArgs),
    /// List the held locks (under PREFIX) with their TTLs, holders and fences.
    List(admin::ListArgs),
    /// Release a lock. DANGEROUS with --force: deletes the lock whoever holds it.
    Release(admin::ReleaseArgs),
    /// Benchmark a backend: cycle, contended or stampede.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout, e.g. `cachelock man > cachelock.1`,
    /// or a subcommand's (`cachelock man run > cachelock-run.1`).
    Man {
        /// The subcommand whose page to print.
        subcommand: Option<String>,
    },
}

/// A benchmark worker process: `cachelock __bench-worker ...`, started by
/// `bench` with the backend URL in its environment. Parsed apart from
/// [`Cli`] so that completions and the man page do not offer it.
#[derive(Debug, Parser)]
#[command(name = "cachelock __bench-worker", hide = true)]
struct WorkerCli {
    #[command(flatten)]
    global: Global,
    #[command(flatten)]
    args: bench::WorkerArgs,
}

/// What to run: the user's command line, or a worker's.
enum Parsed {
    User(Cli),
    Worker(WorkerCli),
}

fn parse() -> Result<Parsed, clap::Error> {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == bench::WORKER_ARG) {
        argv.remove(1);
        return WorkerCli::try_parse_from(argv).map(Parsed::Worker);
    }
    Cli::try_parse_from(argv).map(Parsed::User)
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(Parsed::User(cli)) => cli,
        Ok(Parsed::Worker(w)) => return run_async(&w.global, bench::worker(&w.global, w.args)),
        Err(e) => {
            // Help and version go to stdout with 0; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match &cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "cachelock",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Cmd::Man { subcommand } => return man(subcommand.as_deref()),
        _ => {}
    }
    let global = cli.global;
    run_async(&global, async {
        match cli.cmd {
            Cmd::Run(args) => run::run(&global, args).await,
            Cmd::Status(args) => admin::status(&global, args).await,
            Cmd::List(args) => admin::list(&global, args).await,
            Cmd::Release(args) => admin::release(&global, args).await,
            Cmd::Bench(cmd) => bench::bench(&global, cmd).await,
            Cmd::Completions { .. } | Cmd::Man { .. } => Ok(0),
        }
    })
}

/// Runs `work` on a current-thread runtime and turns its result into the
/// exit code.
fn run_async(
    global: &Global,
    work: impl std::future::Future<Output = Result<u8, Fail>>,
) -> ExitCode {
    common::init_tracing(global.verbose);
    // One thread: the command is spawned from the main thread, which lives
    // as long as the process, so its parent-death signal fires only when
    // cachelock itself dies.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cachelock: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(work);
    // Let background clean-ups finish (a guard released on drop, the token
    // of an add whose answer was lost): a runtime that shuts down drops
    // them, and a late add would then hold the lock for a whole lease.
    runtime.block_on(drain(DRAIN_LIMIT));
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Fail { code, message }) => {
            eprintln!("cachelock: {message}");
            ExitCode::from(code)
        }
    }
}

/// Prints the man page of `cachelock` or of one of its subcommands.
fn man(subcommand: Option<&str>) -> ExitCode {
    let cmd = Cli::command();
    let page = match subcommand {
        None => clap_mangen::Man::new(cmd),
        Some(name) => match cmd.find_subcommand(name) {
            Some(sub) => clap_mangen::Man::new(sub.clone()).title(format!("cachelock-{name}")),
            None => {
                eprintln!("cachelock: no subcommand {name:?} (see cachelock --help)");
                return ExitCode::from(2);
            }
        },
    };
    match page.render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cachelock: cannot write the man page: {e}");
            ExitCode::from(2)
        }
    }
}

/// Waits until no spawned task is left, at most `limit`.
async fn drain(limit: Duration) {
    let handle = tokio::runtime::Handle::current();
    let until = tokio::time::Instant::now() + limit;
    while handle.metrics().num_alive_tasks() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
