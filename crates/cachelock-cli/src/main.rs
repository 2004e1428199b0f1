//! The `cachelock` command: run a command under a distributed lock kept in a
//! cache, inspect and force-release locks, and benchmark backends.
//!
//! See `cachelock --help` and the README for usage and exit codes.

mod admin;
mod bench;
mod common;
mod run;
mod stampede;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::common::{Fail, Global};

/// Exit codes, shown at the end of `--help`.
const EXIT_CODES: &str = "\
Exit codes (run):
  N        the command's own exit code
  128+S    the command was killed by signal S (e.g. 143 for SIGTERM)
  1        the lock was held (--no-wait) or --wait ran out; change with -E/--conflict-exit-code
  2        usage error, bad backend URL, unreachable backend or other cachelock error
  126/127  the command could not be started / was not found
Exit codes (status): 0 held, 1 free, 2 error.  (release): 0 released, 1 nothing to release, 2 error.

Backend URLs (--backend or CACHELOCK_BACKEND):
  sqlite:///path/file.sqlite3   embedded, shared by all processes on this machine (the default:
                                $XDG_CACHE_HOME/cachelock/locks.sqlite3, i.e. ~/.cache/...)
  redis://host:port[/db]  rediss://...  redis+unix:///socket  redis+cluster://h1:p1,h2:p2
  memcached://h1:p1,h2:p2       memory://   (in-process; bench only)

Keys: KEY is put under the namespace (--namespace, default \"cachelock\"): the lock lives in the
cache under \"cachelock:KEY\". Use --namespace '' to use KEY as the full cache key.";

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
    /// Release a lock. DANGEROUS with --force: deletes the lock whoever holds it.
    Release(admin::ReleaseArgs),
    /// Benchmark a backend: cycle, contended or stampede.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Internal: one benchmark worker process.
    #[command(name = "__bench-worker", hide = true)]
    Worker(bench::WorkerArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with 0; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    common::init_tracing(cli.global.verbose);
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
    let result = runtime.block_on(async move {
        match cli.cmd {
            Cmd::Run(args) => run::run(&cli.global, args).await,
            Cmd::Status(args) => admin::status(&cli.global, args).await,
            Cmd::Release(args) => admin::release(&cli.global, args).await,
            Cmd::Bench(cmd) => bench::bench(&cli.global, cmd).await,
            Cmd::Worker(args) => bench::worker(&cli.global, args).await,
        }
    });
    // Do not wait for background tasks (e.g. a release handed off by a
    // dropped guard) longer than a moment.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Fail { code, message }) => {
            eprintln!("cachelock: {message}");
            ExitCode::from(code)
        }
    }
}
