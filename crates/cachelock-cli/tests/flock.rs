//! Issue 13, "flock parity and cron habits": what a `flock(1)` and cron user
//! expects of `cachelock run`, tested on the built binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Env, key, kill, server_url, stderr, stdout, wait_line, wait_output};

#[test]
fn dash_c_runs_a_shell_string() {
    let env = Env::new();
    let out = env.run(&["run", "-c", "echo $((6 * 7)) | tr 4 x; exit 5", &key("c")]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(stdout(&out), "x2\n");
    // -c and a command are not both allowed.
    let out = env.run(&["run", "-c", "true", &key("c"), "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_command_needs_no_double_dash() {
    let env = Env::new();
    let out = env.run(&[
        "run",
        &key("no-dash"),
        "printf",
        "%s|",
        "-n",
        "--lease",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "-n|--lease|x|",
        "options after CMD belong to CMD"
    );
    let out = env.run(&["run", "-n", &key("no-dash"), "echo", "hi"]);
    assert_eq!(stdout(&out), "hi\n");
}

#[test]
fn bare_numbers_are_seconds() {
    let env = Env::new();
    let k = key("bare");
    let holder = env.spawn(&["run", &k, "--", "sleep", "2"]);
    env.wait_held(&k);
    let t = Instant::now();
    let out = env.run(&["run", "-w", "0.5", &k, "--", "true"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("timed out after 500ms"),
        "{}",
        stderr(&out)
    );
    assert!(t.elapsed() < Duration::from_millis(1800));
    let out = env.run(&["run", "-w", "5", &k, "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    wait_output(holder, Duration::from_secs(10));
}

#[test]
fn verbose_says_what_happened_in_plain_words() {
    let env = Env::new();
    let k = key("verbose");
    let out = env.run(&["-v", "run", "--lease", "1m", &k, "--", "sleep", "0.3"]);
    assert_eq!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(err.contains("cachelock: getting lock"), "{err}");
    assert!(err.contains("cachelock: running sleep 0.3"), "{err}");
    assert!(err.contains("cachelock: released lock"), "{err}");
    assert!(!err.contains('\u{1b}'), "no ANSI colour on a pipe: {err:?}");
    assert!(!err.contains("tv_sec") && !err.contains("µs"), "{err}");
    // Durations are rounded: at most one decimal.
    for word in err.split_whitespace() {
        if let Some(num) = word.trim_end_matches([',', ')']).strip_suffix('s')
            && let Some((_, frac)) = num.split_once('.')
        {
            assert!(frac.len() <= 1, "{word} in {err}");
        }
    }
    // Quiet without -v.
    let out = env.run(&["run", &k, "--", "true"]);
    assert_eq!(stderr(&out), "");
}

#[test]
fn timeout_stops_the_command_with_124() {
    let env = Env::new();
    let k = key("timeout");
    let t = Instant::now();
    let out = env.run(&["run", "--timeout", "300ms", &k, "--", "sleep", "10"]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(stderr(&out).contains("--timeout"), "{}", stderr(&out));
    // SIGTERM ignored: SIGKILL after --kill-grace; the code is settable.
    let out = env.run(&[
        "run",
        "--timeout",
        "300ms",
        "--kill-grace",
        "200ms",
        "--timeout-exit-code",
        "99",
        &k,
        "--",
        "sh",
        "-c",
        "trap '' TERM; sleep 5",
    ]);
    assert_eq!(out.status.code(), Some(99), "{}", stderr(&out));
    assert!(stderr(&out).contains("SIGKILL"), "{}", stderr(&out));
    assert_eq!(env.run(&["status", &k]).status.code(), Some(1), "released");
}

#[test]
fn max_hold_stops_renewing_and_the_command() {
    let env = Env::new();
    let k = key("max-hold");
    let t = Instant::now();
    let out = env.run(&["run", "--max-hold", "400ms", &k, "--", "sleep", "10"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(stderr(&out).contains("--max-hold"), "{}", stderr(&out));
    let out = env.run(&[
        "run",
        "--max-hold",
        "200ms",
        "--max-hold-exit-code",
        "0",
        &k,
        "--",
        "sleep",
        "5",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn exit_codes_are_settable_and_documented() {
    let env = Env::new();
    let help = stdout(&env.run(&["run", "--help"]));
    for code in [
        "124",
        "--conflict-exit-code",
        "--error-exit-code",
        "--lost-exit-code",
        "--timeout-exit-code",
        "--max-hold-exit-code",
        "--on-backend-error",
    ] {
        assert!(help.contains(code), "{code} in run --help");
    }
    let dead = format!("redis://127.0.0.1:{}", common::free_port());
    let out = env.run(&[
        "--backend",
        &dead,
        "run",
        "--error-exit-code",
        "69",
        &key("e"),
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
}

#[test]
fn on_backend_error_run_skip_fail() {
    let env = Env::new();
    let dead = format!("redis://127.0.0.1:{}", common::free_port());
    let marker = env.file("ran");
    let m = marker.to_str().unwrap();
    let out = env.run(&[
        "--backend",
        &dead,
        "run",
        "--on-backend-error",
        "fail",
        &key("x"),
        "--",
        "touch",
        m,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!marker.exists());
    let out = env.run(&[
        "--backend",
        &dead,
        "run",
        "--on-backend-error",
        "skip",
        &key("x"),
        "--",
        "touch",
        m,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!marker.exists(), "skip does not run the command");
    assert!(stderr(&out).contains("skipping"), "{}", stderr(&out));
    let out = env.run(&[
        "--backend",
        &dead,
        "run",
        "--on-backend-error",
        "run",
        &key("x"),
        "--",
        "sh",
        "-c",
        &format!("touch {m}; exit 6"),
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(marker.exists(), "run runs the command without the lock");
    assert!(
        stderr(&out).contains("WITHOUT the lock"),
        "{}",
        stderr(&out)
    );
    // A bad URL is a usage error, never "run anyway".
    let out = env.run(&[
        "--backend",
        "foo://x",
        "run",
        "--on-backend-error",
        "run",
        &key("x"),
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn version_completions_and_man_page() {
    let env = Env::new();
    let out = env.run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).starts_with("cachelock "), "{}", stdout(&out));
    for shell in ["bash", "zsh", "fish"] {
        let out = env.run(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(
            text.contains("cachelock") && text.contains("kill-on-loss"),
            "{shell}"
        );
        assert!(!text.contains("__bench-worker"), "{shell}: hidden command");
    }
    let out = env.run(&["man"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(text.contains(".TH cachelock"), "{text}");
    assert!(
        text.contains("Exit codes"),
        "the man page has the exit codes"
    );
    let out = env.run(&["man", "run"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(text.contains(".TH cachelock-run"), "{text}");
    assert!(text.contains(r"kill\-on\-loss"), "run's options: {text}");
    assert_eq!(env.run(&["man", "nosuch"]).status.code(), Some(2));
    assert_eq!(
        env.run(&["completions", "nosuchshell"]).status.code(),
        Some(2)
    );
}

/// Ctrl-C once is forwarded; a second Ctrl-C kills the command and exits.
#[test]
fn a_second_ctrl_c_kills_the_command() {
    let env = Env::new();
    let k = key("ctrl-c");
    let ready = env.file("ready");
    let script = format!(
        "trap 'echo got-int' INT; echo > {}; while :; do sleep 0.05; done",
        ready.display()
    );
    let holder = env.spawn(&["run", &k, "--", "sh", "-c", &script]);
    wait_line(&ready);
    kill("INT", holder.id());
    std::thread::sleep(Duration::from_millis(300));
    kill("INT", holder.id());
    let (out, took) = wait_output(holder, Duration::from_secs(5));
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("got-int"),
        "the first one was forwarded"
    );
    assert!(stderr(&out).contains("SIGKILL"), "{}", stderr(&out));
    assert!(took < Duration::from_secs(2));
    assert_eq!(env.run(&["status", &k]).status.code(), Some(1), "released");
}

/// `rediss://` with a private CA: refused without --tls-ca, served with it
/// (and with CACHELOCK_TLS_CA).
#[test]
#[ignore = "needs the test servers: scripts/test"]
fn tls_ca_trusts_a_private_ca() {
    let url = server_url("CACHELOCK_TEST_REDIS_TLS_URL");
    let ca = server_url("CACHELOCK_TEST_REDIS_TLS_CA");
    let env = Env::with_backend(&url);
    let k = key("tls");
    let out = env.run(&["status", &k]);
    assert_eq!(out.status.code(), Some(2), "unknown CA: {}", stderr(&out));
    let out = env.run(&["--tls-ca", &ca, "status", &k]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = env
        .cmd()
        .env("CACHELOCK_TLS_CA", &ca)
        .args(["run", &k, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = env.run(&["--tls-ca", "/nonexistent/ca.pem", "status", &k]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/ca.pem"),
        "{}",
        stderr(&out)
    );
}
