//! The `cachelock` command tested as a user runs it: the built binary,
//! spawned as a process, on the embedded default backend (a SQLite file in a
//! per-test cache dir) and, in the `#[ignore]`d tests that `scripts/test`
//! runs, on the test Redis, Redis Cluster and Memcached.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::{Env, PrivateServer, key, server_env, server_url, stderr, stdout, wait_output};

/// The default exit code for "the command ran, but the lock was lost".
const LOST: i32 = 3;

// ---------------------------------------------------------------- run

#[test]
fn child_exit_code_and_environment() {
    let env = Env::new();
    let k = key("exit");
    let out = env.run(&[
        "run",
        &k,
        "--",
        "sh",
        "-c",
        "echo \"$CACHELOCK_KEY|$CACHELOCK_TOKEN|$CACHELOCK_FENCE\"; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let line = stdout(&out);
    let fields: Vec<&str> = line.trim().split('|').collect();
    let [got_key, token, fence] = fields[..] else {
        panic!("{line:?}")
    };
    assert_eq!(got_key, format!("cachelock:{k}"));
    assert_eq!(token.len(), 36, "a UUID token: {token:?}");
    let fence: u64 = fence.parse().expect("CACHELOCK_FENCE is a number");
    let out = env.run(&["run", &k, "--", "sh", "-c", "echo $CACHELOCK_FENCE"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let next: u64 = stdout(&out).trim().parse().unwrap();
    assert!(
        next > fence,
        "the next holder's fence {next} is above {fence}"
    );
    // Released after the command: the lock is free again.
    assert_eq!(env.run(&["status", &k]).status.code(), Some(1));
}

#[test]
fn arguments_are_passed_without_a_shell() {
    let env = Env::new();
    let out = env.run(&[
        "run",
        &key("argv"),
        "--",
        "printf",
        "%s|",
        "a b",
        "$HOME",
        "*",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "a b|$HOME|*|");
}

#[test]
fn no_wait_conflict_uses_the_conflict_code() {
    let env = Env::new();
    let k = key("nowait");
    let holder = env.spawn(&["run", &k, "--", "sleep", "3"]);
    env.wait_held(&k);
    let marker = env.file("ran");
    let touch = ["run", "-n", &k, "--", "touch", marker.to_str().unwrap()];
    let out = env.run(&touch);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is held by someone else"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["run", "-n", "-E", "42", &k, "--", "true"]);
    assert_eq!(out.status.code(), Some(42));
    assert!(
        !marker.exists(),
        "the command must not run without the lock"
    );
    let (out, _) = wait_output(holder, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0));
    // Free again: -n now runs the command.
    assert_eq!(env.run(&touch).status.code(), Some(0));
    assert!(marker.exists());
}

#[test]
fn wait_times_out_then_succeeds_when_released() {
    let env = Env::new();
    let k = key("wait");
    let holder = env.spawn(&["run", &k, "--", "sleep", "2"]);
    env.wait_held(&k);
    let t = Instant::now();
    let out = env.run(&["run", "-w", "500ms", &k, "--", "true"]);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("timed out after 500ms"),
        "{}",
        stderr(&out)
    );
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(took < Duration::from_millis(1800), "{took:?}");
    // A longer wait gets the lock once the holder ends.
    let out = env.run(&["run", "-w", "10s", &k, "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let (out, _) = wait_output(holder, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn child_killed_by_signal_gives_128_plus_signal() {
    let env = Env::new();
    let out = env.run(&["run", &key("sig"), "--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(out.status.code(), Some(128 + 9));
    let out = env.run(&["run", &key("sig"), "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15));
}

#[test]
fn sigterm_and_sigint_are_forwarded_and_the_lock_released() {
    let env = Env::new();
    for (sig, num) in [("TERM", 15), ("INT", 2)] {
        let k = key("forward");
        let marker = env.file(&format!("got-{sig}"));
        // The child records the signal it gets, then exits with 128+N.
        let script = format!(
            "trap 'kill $!; touch {m}; exit {code}' {sig}; sleep 20 >/dev/null 2>&1 & wait",
            m = marker.display(),
            code = 128 + num
        );
        let child = env.spawn(&["run", &k, "--", "sh", "-c", &script]);
        env.wait_held(&k);
        std::thread::sleep(Duration::from_millis(100));
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let (out, _) = wait_output(child, Duration::from_secs(5));
        assert_eq!(
            out.status.code(),
            Some(128 + num),
            "{sig}: {}",
            stderr(&out)
        );
        assert!(marker.exists(), "the child got SIG{sig}");
        assert_eq!(
            env.run(&["status", &k]).status.code(),
            Some(1),
            "released after the child ended"
        );
    }
}

#[test]
fn lease_renewal_keeps_a_short_lease_alive() {
    let env = Env::new();
    let k = key("renew");
    let holder = env.spawn(&["run", "--lease", "1s", &k, "--", "sleep", "3"]);
    env.wait_held(&k);
    std::thread::sleep(Duration::from_millis(2200));
    // Past two leases, the lock is still held, with at most a lease left.
    let out = env.run(&["status", "--json", &k]);
    assert_eq!(out.status.code(), Some(0), "still held at 2.2 s");
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let ttl = v["ttl_s"].as_f64().unwrap();
    assert!(ttl > 0.0 && ttl <= 1.0, "{ttl}");
    assert_eq!(
        env.run(&["run", "-n", &k, "--", "true"]).status.code(),
        Some(1)
    );
    let (out, _) = wait_output(holder, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0));
    assert!(!stderr(&out).contains("lost"), "{}", stderr(&out));
}

#[test]
fn kill_on_loss_after_force_release() {
    let env = Env::new();
    let k = key("loss");
    let holder = env.spawn(&[
        "run",
        "--lease",
        "900ms",
        "--kill-on-loss",
        &k,
        "--",
        "sleep",
        "20",
    ]);
    env.wait_held(&k);
    let out = env.run(&["release", "--force", &k]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("force-released"));
    // Renewal (every 300 ms) finds the key gone and sends SIGTERM.
    let (out, took) = wait_output(holder, Duration::from_secs(5));
    assert_eq!(out.status.code(), Some(LOST), "{}", stderr(&out));
    assert!(stderr(&out).contains("lost the lock"), "{}", stderr(&out));
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn kill_on_loss_escalates_to_sigkill() {
    let env = Env::new();
    let k = key("loss-kill");
    let holder = env.spawn(&[
        "run",
        "--lease",
        "600ms",
        "--kill-on-loss",
        "--kill-grace",
        "300ms",
        &k,
        "--",
        "sh",
        "-c",
        "trap '' TERM; sleep 3",
    ]);
    env.wait_held(&k);
    assert_eq!(env.run(&["release", "--force", &k]).status.code(), Some(0));
    let (out, _) = wait_output(holder, Duration::from_secs(5));
    assert_eq!(out.status.code(), Some(LOST), "{}", stderr(&out));
    assert!(stderr(&out).contains("SIGKILL"), "{}", stderr(&out));
}

#[test]
fn loss_without_kill_warns_and_keeps_the_command() {
    let env = Env::new();
    let k = key("loss-warn");
    let holder = env.spawn(&["run", "--lease", "600ms", &k, "--", "sleep", "1.5"]);
    env.wait_held(&k);
    assert_eq!(env.run(&["release", "--force", &k]).status.code(), Some(0));
    let (out, took) = wait_output(holder, Duration::from_secs(5));
    assert_eq!(out.status.code(), Some(LOST), "{}", stderr(&out));
    assert!(
        took >= Duration::from_millis(1300),
        "the command ran on: {took:?}"
    );
    assert!(
        stderr(&out).contains("lost the lock") && stderr(&out).contains("keeps running"),
        "{}",
        stderr(&out)
    );
}

/// 8 concurrent `cachelock run` processes on one key: the children's
/// start/end stamps (`date +%s%N`, appended to one file) never overlap.
fn mutual_exclusion(env: &Env, procs: usize) {
    let k = key("mutex");
    let log = env.file("stamps.log");
    let script = format!(
        "echo \"s $$ $(date +%s%N)\" >> {l}; sleep 0.05; echo \"e $$ $(date +%s%N)\" >> {l}",
        l = log.display()
    );
    let children: Vec<Child> = (0..procs)
        .map(|_| {
            env.spawn(&[
                "run",
                "-w",
                "30s",
                "--retry-interval",
                "10ms",
                &k,
                "--",
                "sh",
                "-c",
                &script,
            ])
        })
        .collect();
    for c in children {
        let (out, _) = wait_output(c, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    check_no_overlap(&log, procs);
}

fn check_no_overlap(log: &Path, procs: usize) {
    let text = std::fs::read_to_string(log).unwrap();
    let mut starts = std::collections::HashMap::new();
    let mut intervals = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [kind, pid, ns] = parts[..] else {
            panic!("bad line {line:?}")
        };
        let ns: u128 = ns.parse().unwrap();
        match kind {
            "s" => {
                starts.insert(pid.to_owned(), ns);
            }
            _ => intervals.push((starts.remove(pid).unwrap(), ns)),
        }
    }
    assert_eq!(intervals.len(), procs, "every child ran once:\n{text}");
    intervals.sort_unstable();
    for w in intervals.windows(2) {
        assert!(
            w[1].0 >= w[0].1,
            "critical sections overlap: {:?} and {:?}",
            w[0],
            w[1]
        );
    }
}

#[test]
fn mutual_exclusion_on_the_embedded_default() {
    mutual_exclusion(&Env::new(), 8);
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn mutual_exclusion_on_redis() {
    mutual_exclusion(&server_env("CACHELOCK_TEST_REDIS_URL"), 8);
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn mutual_exclusion_on_redis_cluster() {
    let urls = server_url("CACHELOCK_TEST_REDIS_CLUSTER_URLS");
    let hosts: Vec<&str> = urls
        .split(',')
        .map(|u| u.trim().trim_start_matches("redis://"))
        .collect();
    let url = format!("redis+cluster://{}", hosts.join(","));
    let env = Env::with_backend(&url);
    let out = env.run(&["status", &key("probe")]);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{url}: {}",
        stderr(&out)
    );
    mutual_exclusion(&env, 8);
}

/// `redis+sentinel://`: the command finds the master through the Sentinels
/// (the failover itself is tested in the library's tests/sentinel.rs).
#[test]
#[ignore = "needs the test servers: scripts/test"]
fn mutual_exclusion_on_redis_sentinel() {
    mutual_exclusion(&server_env("CACHELOCK_TEST_REDIS_SENTINEL_URL"), 8);
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn mutual_exclusion_on_memcached() {
    mutual_exclusion(&server_env("CACHELOCK_TEST_MEMCACHED_URLS"), 8);
}

// ---------------------------------------------------- errors and usage

fn assert_one_line_error(out: &Output, want: &str) {
    assert_eq!(out.status.code(), Some(2), "{}", stderr(out));
    let err = stderr(out);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("cachelock: "), "{err:?}");
    assert!(err.contains(want), "{err:?} lacks {want:?}");
}

#[test]
fn bad_urls_exit_2_with_one_line() {
    let env = Env::new();
    for (url, want) in [
        ("foo://x", "unknown scheme \"foo\""),
        ("localhost:6379", "no scheme"),
        ("redis://host:99999", "invalid port"),
        ("memcached://", "at least one host"),
        ("redis+cluster://a:1,,b:2", "stray comma"),
        ("sqlite://", "needs a file path"),
        ("redis://user:secret@host:0", "user:***@host:0"),
    ] {
        let out = env.run(&["--backend", url, "run", &key("url"), "--", "true"]);
        assert_one_line_error(&out, want);
        assert!(!stderr(&out).contains("secret"));
        let out = env.run(&["--backend", url, "status", &key("url")]);
        assert_one_line_error(&out, want);
    }
    // memory:// is refused where it would exclude nobody.
    let out = env.run(&["--backend", "memory://", "run", &key("mem"), "--", "true"]);
    assert_one_line_error(&out, "memory://");
}

#[test]
fn unreachable_backends_exit_2_with_one_line() {
    let env = Env::new();
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for url in [
        "sqlite:///nonexistent-cachelock-dir/locks.sqlite3".to_owned(),
        format!("redis://127.0.0.1:{dead_port}"),
        format!("memcached://127.0.0.1:{dead_port}"),
    ] {
        let marker = env.file("ran");
        let t = Instant::now();
        let out = env.run(&[
            "--backend",
            &url,
            "run",
            &key("down"),
            "--",
            "touch",
            marker.to_str().unwrap(),
        ]);
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{url}: gave up in time"
        );
        assert_one_line_error(&out, "");
        assert!(!marker.exists(), "{url}: no command without the lock");
    }
}

#[test]
fn usage_errors_exit_2() {
    let env = Env::new();
    for args in [
        &["run", "k"][..],
        &["run", "-n", "-w", "1s", "k", "--", "true"],
        &["run", "--lease", "soon", "k", "--", "true"],
        &["run", "-E", "300", "k", "--", "true"],
        &["release", "k"],
        &["nonsense"],
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    let out = env.run(&["run", "k", "--", "/nonexistent/program"]);
    assert_eq!(out.status.code(), Some(127));
    let out = env.run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("Exit codes"), "exit codes in --help");
}

// ------------------------------------------------------ status/release

#[test]
fn status_and_release() {
    let env = Env::new();
    let k = key("status");
    let out = env.run(&["status", &k]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("free"));
    let out = env.run(&["release", "--force", &k]);
    assert_eq!(out.status.code(), Some(1), "nothing to release");

    let seen = env.file("token");
    let script = format!(
        "echo $CACHELOCK_TOKEN > {}; exec sleep 5 >/dev/null 2>&1",
        seen.display()
    );
    let holder = env.spawn(&["run", &k, "--", "sh", "-c", &script]);
    env.wait_held(&k);
    let out = env.run(&["status", &k]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("held by token"), "{}", stdout(&out));
    assert!(stdout(&out).contains("expires in"), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("pid {}", holder.id())) && text.contains("command sh -c"),
        "{text}"
    );
    let out = env.run(&["release", "--token", "not-the-token", &k]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        env.run(&["status", &k]).status.code(),
        Some(0),
        "still held"
    );
    // Kill the holder hard: its lock stays until released by token.
    let json = env.run(&["status", "--json", &k]);
    let v: serde_json::Value = serde_json::from_str(stdout(&json).trim()).unwrap();
    let token = v["token"].as_str().unwrap().to_owned();
    assert!(v["fence"].as_u64().is_some_and(|f| f > 0), "{v}");
    assert_eq!(v["holder"]["pid"], holder.id(), "{v}");
    assert!(v["holder"]["host"].is_string(), "{v}");
    assert!(v["holder"]["since_unix_ms"].is_u64(), "{v}");
    let cmd = v["holder"]["command"].as_str().unwrap();
    assert!(cmd.starts_with("sh -c") && cmd.contains("sleep 5"), "{v}");
    Command::new("kill")
        .args(["-9", &holder.id().to_string()])
        .status()
        .unwrap();
    let (out, _) = wait_output(holder, Duration::from_secs(5));
    assert_eq!(out.status.code(), None, "killed");
    let seen = std::fs::read_to_string(&seen).unwrap();
    assert_eq!(seen.trim(), token, "the child saw the same token");
    assert_eq!(env.run(&["status", &k]).status.code(), Some(0), "orphaned");
    let out = env.run(&["release", "--token", &token, &k]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(env.run(&["status", &k]).status.code(), Some(1));
}

#[test]
fn namespace_is_put_before_the_key() {
    let env = Env::new();
    let k = key("ns");
    let out = env.run(&[
        "--namespace",
        "",
        "run",
        &k,
        "--",
        "sh",
        "-c",
        "echo $CACHELOCK_KEY",
    ]);
    assert_eq!(stdout(&out).trim(), k);
    let out = env.run(&[
        "--namespace",
        "team",
        "run",
        &k,
        "--",
        "sh",
        "-c",
        "echo $CACHELOCK_KEY",
    ]);
    assert_eq!(stdout(&out).trim(), format!("team:{k}"));
}

// ---------------------------------------------------------------- bench

fn json_lines(out: &Output) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    let text = stdout(out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line: {text:?}");
    serde_json::from_str(lines[0]).unwrap()
}

#[test]
fn bench_cycle_reports_json() {
    let env = Env::new();
    for url in ["memory://", "sqlite://DIR/b.sqlite3"] {
        let url = url.replace("DIR", env.dir.path().to_str().unwrap());
        let v = json_lines(&env.run(&["--backend", &url, "bench", "cycle", "-n", "300", "--json"]));
        assert_eq!(v["workload"], "cycle");
        assert_eq!(v["cycles"], 300);
        assert!(v["seconds"].as_f64().unwrap() > 0.0);
        assert!(v["cycles_per_s"].as_f64().unwrap() > 0.0);
    }
    // The table form has a header row and a value row.
    let out = env.run(&["--backend", "memory://", "bench", "cycle", "-n", "10"]);
    let text = stdout(&out);
    assert!(
        text.lines().next().unwrap().contains("cycles_per_s"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 2);
}

#[test]
fn bench_contended_has_no_violations_on_the_embedded_default() {
    let env = Env::new();
    let v = json_lines(&env.run(&[
        "bench",
        "contended",
        "--procs",
        "4",
        "--duration",
        "1s",
        "--check",
        "--json",
    ]));
    assert_eq!(v["workload"], "contended");
    assert_eq!(v["procs"], 4);
    let acq = v["acquisitions"].as_u64().unwrap();
    assert!(acq > 4, "{v}");
    assert_eq!(v["violations"], 0, "{v}");
    assert_eq!(v["overlaps"], 0, "{v}");
    assert!(v["per_worker_min"].as_u64().unwrap() <= v["per_worker_max"].as_u64().unwrap());
    assert!(v["acq_per_s"].as_f64().unwrap() > 0.0);
}

/// With memory:// the contended workers are tasks in one process.
#[test]
fn bench_contended_on_memory_runs_tasks() {
    let env = Env::new();
    let v = json_lines(&env.run(&[
        "--backend",
        "memory://",
        "bench",
        "contended",
        "--procs",
        "4",
        "--duration",
        "300ms",
        "--check",
        "--json",
    ]));
    assert_eq!(v["violations"], 0, "{v}");
    assert_eq!(v["overlaps"], 0, "{v}");
    assert!(v["acquisitions"].as_u64().unwrap() > 0);
}

/// The checks can fail: without the lock, 4 processes doing GET-then-SET
/// lose updates and their critical sections overlap.
#[test]
fn bench_contended_without_the_lock_shows_violations() {
    let env = Env::new();
    let v = json_lines(&env.run(&[
        "bench",
        "contended",
        "--procs",
        "4",
        "--duration",
        "1s",
        "--check",
        "--no-lock",
        "--json",
    ]));
    assert_eq!(v["lock"], false);
    assert!(v["violations"].as_u64().unwrap() > 0, "{v}");
    assert!(v["overlaps"].as_u64().unwrap() > 0, "{v}");
}

/// The cache server dies under a running command: renewals fail, and once
/// the lease has run out by the local clock the lock counts as lost and
/// --kill-on-loss stops the command.
#[test]
#[ignore = "needs the test servers: scripts/test"]
fn server_gone_during_run_loses_the_lease() {
    let mut server = PrivateServer::memcached();
    let env = Env::with_backend(&format!("memcached://127.0.0.1:{}", server.port));
    let k = key("server-gone");
    let holder = env.spawn(&[
        "run",
        "--lease",
        "1s",
        "--kill-on-loss",
        &k,
        "--",
        "sleep",
        "20",
    ]);
    env.wait_held(&k);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let (out, took) = wait_output(holder, Duration::from_secs(6));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(LOST), "{err}");
    assert!(err.contains("could not renew the lease"), "{err}");
    assert!(err.contains("lost the lock"), "{err}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// SIGTERM while waiting for the lock: exit 128+15 at once, the command
/// never runs, and the holder's lock is untouched.
#[test]
fn sigterm_while_waiting_gives_up() {
    let env = Env::new();
    let k = key("wait-term");
    let holder = env.spawn(&["run", &k, "--", "sleep", "3"]);
    env.wait_held(&k);
    let marker = env.file("ran");
    let waiter = env.spawn(&["run", &k, "--", "touch", marker.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(300));
    Command::new("kill")
        .args(["-TERM", &waiter.id().to_string()])
        .status()
        .unwrap();
    let (out, took) = wait_output(waiter, Duration::from_secs(3));
    assert_eq!(out.status.code(), Some(128 + 15), "{}", stderr(&out));
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(!marker.exists());
    assert_eq!(
        env.run(&["status", &k]).status.code(),
        Some(0),
        "still held"
    );
    let (out, _) = wait_output(holder, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0));
}

/// Stampede on the embedded default: with the lock, 4 processes starting
/// together on a cold key compute once; without it, more than once.
#[test]
fn bench_stampede_computes_once_with_the_lock() {
    let env = Env::new();
    let args = [
        "bench",
        "stampede",
        "--procs",
        "4",
        "--tasks",
        "2",
        "--compute",
        "200ms",
        "--json",
    ];
    let v = json_lines(&env.run(&args));
    assert_eq!(v["workload"], "stampede");
    assert_eq!(v["lock"], true);
    assert_eq!(
        (v["procs"].as_u64(), v["tasks"].as_u64()),
        (Some(4), Some(2))
    );
    assert_eq!(v["compute_s"].as_f64(), Some(0.2));
    assert_eq!(v["computes"], 1, "{v}");
    let (p50, max) = (v["p50_s"].as_f64().unwrap(), v["max_s"].as_f64().unwrap());
    assert!(p50 >= 0.2 && p50 <= max && max < 5.0, "{v}");

    let mut no_lock = args.to_vec();
    no_lock.push("--no-lock");
    let v = json_lines(&env.run(&no_lock));
    assert_eq!(v["lock"], false);
    assert!(v["computes"].as_u64().unwrap() > 1, "{v}");
}
