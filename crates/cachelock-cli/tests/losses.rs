//! Issue 10, the command's half: a lost lock is always reported (and exits
//! with its own code), the command never outlives its lock, interrupted
//! acquires leave no lock behind, and bad input is refused before anything
//! is written.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::{
    Env, alive, first_addr, key, kill, server_env, server_url, stderr, stdout, wait_line,
    wait_output,
};

/// The default exit code for "the command ran, but the lock was lost".
const LOST: i32 = 3;

// ------------------------------------------------ 3: the SQLite file goes

/// `rm -rf ~/.cache` under a running command: the lock file is gone, so a
/// second holder could get in. The loss is reported like any other.
#[test]
fn deleting_the_sqlite_file_is_reported_as_a_loss() {
    let env = Env::new();
    let k = key("rm-rf");
    let holder = env.spawn(&["run", "--lease", "1s", &k, "--", "sleep", "2"]);
    env.wait_held(&k);
    std::fs::remove_dir_all(env.file("cachelock")).unwrap();
    let (out, _) = wait_output(holder, Duration::from_secs(10));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(LOST), "{err}");
    assert!(err.contains("lost the lock"), "{err}");
    assert!(err.contains("deleted or replaced"), "{err}");
}

#[test]
fn deleting_the_sqlite_file_stops_the_command_with_kill_on_loss() {
    let env = Env::new();
    let k = key("rm-rf-kill");
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
    std::fs::remove_dir_all(env.file("cachelock")).unwrap();
    let (out, took) = wait_output(holder, Duration::from_secs(10));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(LOST), "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

// ------------------------------------------- 4: the lost-lock exit code

#[test]
fn a_loss_without_kill_gives_the_lost_exit_code() {
    for (extra, want) in [
        (&[][..], LOST),
        (&["--lost-exit-code", "70"][..], 70),
        (&["--no-lost-exit-code"][..], 0),
    ] {
        let env = Env::new();
        let k = key("lost-code");
        let mut args = vec!["run", "--lease", "600ms"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[&k, "--", "sleep", "1.5"]);
        let holder = env.spawn(&args);
        env.wait_held(&k);
        assert_eq!(env.run(&["release", "--force", &k]).status.code(), Some(0));
        let (out, took) = wait_output(holder, Duration::from_secs(5));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(want), "{extra:?}: {err}");
        assert!(took >= Duration::from_millis(1300), "the command ran on");
        assert!(err.contains("lost the lock"), "{err}");
    }
}

// ------------------------- 5: --kill-on-loss beats the lease on the server

/// The holder is cut off from Redis (a partition through the fault proxy):
/// its renewals hang, and the lock expires on the server while a second
/// holder waits there. In every trial the first command has stopped before
/// the second holder starts.
#[test]
#[ignore = "needs the test servers: scripts/test"]
fn kill_on_loss_stops_the_command_before_the_lease_can_run_out() {
    let redis = server_url("CACHELOCK_TEST_REDIS_URL");
    let direct = server_env("CACHELOCK_TEST_REDIS_URL");
    for trial in 0..20u64 {
        let proxy = Proxy::start(first_addr(&redis));
        let via = Env::with_backend(&format!("redis://{}", proxy.addr()));
        let k = key("partition");
        let stamps = direct.file(&format!("stamps-{trial}"));
        let script = format!(
            "while :; do date +%s%N >> {s}; sleep 0.01; done",
            s = stamps.display()
        );
        let holder = via.spawn(&[
            "run",
            "--lease",
            "1s",
            "--kill-on-loss",
            "--kill-grace",
            "200ms",
            &k,
            "--",
            "sh",
            "-c",
            &script,
        ]);
        direct.wait_held(&k);
        // Cut at a different point of the renewal cycle in each trial.
        std::thread::sleep(Duration::from_millis(100 + (trial * 47) % 333));
        proxy.black_hole(true);
        let second = direct.run(&[
            "run",
            "-w",
            "10s",
            "--retry-interval",
            "5ms",
            &k,
            "--",
            "date",
            "+%s%N",
        ]);
        assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
        let started: u128 = stdout(&second).trim().parse().unwrap();
        let (out, _) = wait_output(holder, Duration::from_secs(10));
        let text = std::fs::read_to_string(&stamps).unwrap();
        let last: u128 = text.lines().filter_map(|l| l.parse().ok()).max().unwrap();
        assert!(
            last < started,
            "trial {trial}: the first command still ran {} ms after the second holder started",
            (last - started) / 1_000_000
        );
        assert_eq!(
            out.status.code(),
            Some(LOST),
            "trial {trial}: {}",
            stderr(&out)
        );
    }
}

// -------------------------------------- 6: kill -9 takes the command down

#[test]
fn sigkill_of_cachelock_takes_the_command_down() {
    let env = Env::new();
    let k = key("pdeathsig");
    let pidfile = env.file("pid");
    let script = format!("echo $$ > {}; exec sleep 30", pidfile.display());
    let holder = env.spawn(&["run", &k, "--", "sh", "-c", &script]);
    let pid: u32 = wait_line(&pidfile).parse().unwrap();
    assert!(alive(pid));
    kill("KILL", holder.id());
    let (out, _) = wait_output(holder, Duration::from_secs(5));
    assert_eq!(out.status.code(), None, "killed");
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "the command (pid {pid}) outlived its cachelock by more than 1 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ------------------------------ 7: interrupted acquires leave no lock behind

/// SIGTERM while the add is on its way to a slow Redis: cachelock waits for
/// the add's answer, removes its token and exits; nothing stays locked.
#[test]
#[ignore = "needs the test servers: scripts/test"]
fn sigterm_during_a_slow_add_leaves_no_lock() {
    let redis = server_url("CACHELOCK_TEST_REDIS_URL");
    let direct = server_env("CACHELOCK_TEST_REDIS_URL");
    let proxy = Proxy::start(first_addr(&redis));
    let k = key("slow-add");
    proxy.delay_containing(k.as_bytes(), Duration::from_millis(1000));
    let via = Env::with_backend(&format!("redis://{}", proxy.addr()));
    let marker = via.file("ran");
    let waiter = via.spawn(&["run", "-n", &k, "--", "touch", marker.to_str().unwrap()]);
    let t = Instant::now();
    while proxy.seen() == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no add was sent");
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = Instant::now();
    kill("TERM", waiter.id());
    let (out, _) = wait_output(waiter, Duration::from_secs(15));
    assert_eq!(out.status.code(), Some(128 + 15), "{}", stderr(&out));
    assert!(!marker.exists(), "the command must not run after SIGTERM");
    // Past the moment the delayed add reached the server.
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(sent.elapsed()));
    let status = direct.run(&["status", &k]);
    assert_eq!(
        status.status.code(),
        Some(1),
        "the add landed and nobody removed it: {}",
        stdout(&status)
    );
}

/// A `-n` attempt whose add times out (Redis answers after the client's 5 s
/// response timeout, and so does the read-back): cachelock fails, and the
/// library hands the removal of the token the late add may store to a
/// background task. cachelock waits for it before exiting (the runtime's
/// shutdown used to drop it), so the late add does not hold the lock for a
/// whole lease. (Redis keeps one connection, so the removal reaches the
/// server after the add.)
#[test]
#[ignore = "needs the test servers: scripts/test"]
fn a_timed_out_add_is_cleaned_up_before_exit() {
    let redis = server_url("CACHELOCK_TEST_REDIS_URL");
    let direct = server_env("CACHELOCK_TEST_REDIS_URL");
    let proxy = Proxy::start(first_addr(&redis));
    let k = key("late-add");
    let delay = Duration::from_millis(5500);
    proxy.delay_containing(k.as_bytes(), delay);
    let via = Env::with_backend(&format!("redis://{}", proxy.addr()));
    let marker = via.file("ran");
    let t = Instant::now();
    let out = via.run(&["run", "-n", &k, "--", "touch", marker.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!marker.exists());
    assert_eq!(proxy.seen(), 3, "add, read-back and removal were sent");
    // The add, the read-back and the removal each waited `delay` in turn.
    std::thread::sleep((delay * 3 + Duration::from_millis(500)).saturating_sub(t.elapsed()));
    let status = direct.run(&["status", &k]);
    assert_eq!(
        status.status.code(),
        Some(1),
        "the late add holds the lock: {}",
        stdout(&status)
    );
}

// ------------------------------------------- 8: waiting through a blip

/// Redis restarts (0.5 s down) while a waiter waits: the waiter retries and
/// gets the lock (the restart lost the holder's), instead of failing on
/// the first error. A backend down at the first attempt still fails at once.
#[test]
#[ignore = "needs the test servers: scripts/test"]
fn a_waiter_waits_through_a_redis_restart() {
    let mut server = common::PrivateServer::redis(None);
    let port = server.port;
    let env = Env::with_backend(&format!("redis://127.0.0.1:{port}"));
    let k = key("blip");
    let holder = env.spawn(&["run", &k, "--", "sleep", "20"]);
    env.wait_held(&k);
    let waiter = env.spawn(&["run", "-w", "20s", &k, "--", "echo", "got it"]);
    std::thread::sleep(Duration::from_millis(500));
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let _server = common::PrivateServer::redis(Some(port));
    let (out, _) = wait_output(waiter, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "got it\n");
    assert!(stderr(&out).contains("still waiting"), "{}", stderr(&out));
    kill("KILL", holder.id());
    let _ = wait_output(holder, Duration::from_secs(5));
    // Down from the start: an error at once, even with a long wait.
    drop(_server);
    let t = Instant::now();
    let out = env.run(&["run", "-w", "20s", &k, "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

// ----------------------------------------------- 9: absurd durations

#[test]
fn absurd_durations_are_refused_before_anything_is_written() {
    let env = Env::new();
    let k = key("absurd");
    let marker = env.file("ran");
    let m = marker.to_str().unwrap();
    for opt in [
        "--lease",
        "--wait",
        "--retry-interval",
        "--kill-grace",
        "--timeout",
        "--max-hold",
    ] {
        for value in ["18446744073709551615s", "31days"] {
            let out = env.run(&["run", opt, value, &k, "--", "touch", m]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{opt} {value}: {err}");
            assert!(err.contains("at most"), "{opt} {value}: {err}");
        }
    }
    assert!(!marker.exists());
    assert!(
        !env.file("cachelock").join("locks.sqlite3").exists(),
        "nothing was written, not even the file"
    );
    assert_eq!(env.run(&["status", &k]).status.code(), Some(1));
    // The documented maximum itself is fine.
    let out = env.run(&["run", "--lease", "30days", &k, "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

// --------------------------------------- 12: -n on a busy SQLite file

/// Another process holds SQLite's write lock: `-n` answers at once (an
/// error, since it cannot tell whether the lock is held) instead of
/// waiting out the 10 s busy timeout.
#[test]
fn no_wait_does_not_block_on_a_busy_sqlite_file() {
    let env = Env::new();
    let k = key("busy");
    assert_eq!(env.run(&["run", &k, "--", "true"]).status.code(), Some(0));
    let db = rusqlite::Connection::open(env.file("cachelock").join("locks.sqlite3")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let t = Instant::now();
    let out = env.run(&["run", "-n", &k, "--", "true"]);
    let took = t.elapsed();
    db.execute_batch("ROLLBACK").unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(took < Duration::from_secs(3), "-n took {took:?}");
}

#[test]
fn an_empty_backend_variable_means_the_default() {
    let env = Env::new();
    let k = key("empty-env");
    let out = env
        .cmd()
        .env("CACHELOCK_BACKEND", "")
        .args(["run", &k, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(env.file("cachelock").join("locks.sqlite3").exists());
}

// ------------------------------------------ 13: passwords stay secret

/// Bench workers get the backend URL through their environment, never on
/// their command line (which `ps` shows to every user).
#[test]
fn bench_workers_do_not_get_the_url_on_argv() {
    let env = Env::new();
    let url = format!("sqlite://{}/secret-name.sqlite3", env.dir.path().display());
    let bench = env.spawn(&[
        "--backend",
        &url,
        "bench",
        "contended",
        "--procs",
        "2",
        "--duration",
        "1500ms",
        "--json",
    ]);
    let t = Instant::now();
    let mut seen = 0;
    while t.elapsed() < Duration::from_millis(1500) {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("__bench-worker") {
                seen += 1;
                assert!(!cmdline.contains("secret-name"), "on argv: {cmdline}");
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (out, _) = wait_output(bench, Duration::from_secs(15));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(seen > 0, "saw the workers");
}

/// Nothing cachelock prints shows the password: status (text and JSON),
/// -v, and the error for a wrong password.
#[test]
#[ignore = "needs the test servers: scripts/test"]
fn passwords_are_never_printed() {
    let server = common::PrivateServer::redis_with_password("hunter2");
    let env = Env::with_backend(&format!("redis://:hunter2@127.0.0.1:{}", server.port));
    let k = key("secret");
    for args in [
        &["status", "--json", &k][..],
        &["status", &k],
        &["-v", "run", &k, "--", "true"],
    ] {
        let out = env.run(args);
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "{args:?}: {}",
            stderr(&out)
        );
        let all = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!all.contains("hunter2"), "{args:?}: {all}");
    }
    let out = env.run(&["status", "--json", &k]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert!(v["backend"].as_str().unwrap().contains("***"), "{v}");
    let wrong = Env::with_backend(&format!("redis://:wrong-pass@127.0.0.1:{}", server.port));
    let out = wrong.run(&["status", &k]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!stderr(&out).contains("wrong-pass"), "{}", stderr(&out));
}

// ------------------------------------------- 16: messages tell the truth

#[test]
fn a_loss_says_whether_another_token_holds_the_lock_or_it_is_gone() {
    // Deleted, nobody else in: "expired, evicted or deleted".
    let env = Env::new();
    let k = key("gone");
    let holder = env.spawn(&["run", "--lease", "900ms", &k, "--", "sleep", "1.2"]);
    env.wait_held(&k);
    assert_eq!(env.run(&["release", "--force", &k]).status.code(), Some(0));
    let (out, _) = wait_output(holder, Duration::from_secs(5));
    let err = stderr(&out);
    assert!(err.contains("expired, was evicted or deleted"), "{err}");
    assert!(!err.contains("another token"), "{err}");
    assert!(err.contains("the command keeps running"), "{err}");

    // Deleted and taken by another process at once: "another token".
    let k = key("taken");
    let holder = env.spawn(&["run", "--lease", "900ms", &k, "--", "sleep", "1.2"]);
    env.wait_held(&k);
    let thief = env.spawn(&[
        "run",
        "-w",
        "5s",
        "--retry-interval",
        "5ms",
        &k,
        "--",
        "sleep",
        "1",
    ]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(env.run(&["release", "--force", &k]).status.code(), Some(0));
    let (out, _) = wait_output(holder, Duration::from_secs(5));
    let err = stderr(&out);
    assert!(err.contains("held by another token"), "{err}");
    assert!(!err.contains("evicted"), "{err}");
    let (out, _) = wait_output(thief, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// A loss found only when the command has ended says so, not that the
/// command keeps running.
#[test]
fn a_loss_found_at_release_does_not_claim_the_command_runs() {
    let env = Env::new();
    let k = key("late-loss");
    // A lease far longer than the run: no renewal happens before the end.
    let holder = env.spawn(&["run", "--lease", "30s", &k, "--", "sleep", "0.6"]);
    env.wait_held(&k);
    assert_eq!(env.run(&["release", "--force", &k]).status.code(), Some(0));
    let (out, _) = wait_output(holder, Duration::from_secs(5));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(LOST), "{err}");
    assert!(err.contains("lost"), "{err}");
    assert!(!err.contains("keeps running"), "{err}");
}
