//! Issue 13, locks shared with djblets: `cachelock --django` against
//! djblets 6.1's own `CacheLock` on Django's cache (Django 4.2, from the
//! virtualenv `scripts/services` makes), on the test Redis and Memcached.
//!
//! The djblets side is `tests/django/peer.py`. Both sides run the same
//! critical section (a marker file that must not exist on entry) and count
//! their entries and overlaps in one directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, NEEDS_SERVERS, first_addr, key, kill, server_url, stderr, stdout, wait_output};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/django/peer.py");

/// Rounds each side takes the lock in the exclusion test.
const ROUNDS: usize = 40;

/// The cachelock side's critical section: the same marker as `critical()`
/// in peer.py, with the shell's noclobber as the exclusive create.
const CRITICAL: &str = r#"if (set -C; : > "$M/inside") 2>/dev/null; then :; else echo cachelock >> "$M/overlaps"; fi
echo cachelock >> "$M/entries"; sleep 0.02; rm -f "$M/inside""#;

/// One test cache: what Django's settings and cachelock's `--backend` say.
struct Target {
    /// peer.py's CACHE argument.
    cache: &'static str,
    /// Django's LOCATION.
    location: String,
    /// cachelock's backend URL, naming the same server.
    url: String,
}

fn redis() -> Target {
    let url = server_url("CACHELOCK_TEST_REDIS_URL");
    Target {
        cache: "redis",
        location: url.clone(),
        url,
    }
}

/// The first Memcached server only: pymemcache's `HashClient` and
/// cachelock spread keys over several servers differently (see the README).
fn memcached() -> Target {
    let addr = first_addr(&server_url("CACHELOCK_TEST_MEMCACHED_URLS"));
    Target {
        cache: "memcached",
        location: addr.to_string(),
        url: format!("memcached://{addr}"),
    }
}

/// The virtualenv's python: set by `scripts/services`; missing while the
/// services are promised is a failure.
fn python() -> String {
    server_url("CACHELOCK_TEST_DJANGO_PYTHON")
}

fn peer(t: &Target, args: &[&str]) -> Command {
    let mut c = Command::new(python());
    c.arg(PEER).arg(t.cache).arg(&t.location).args(args);
    c
}

fn peer_output(t: &Target, args: &[&str]) -> String {
    let out = peer(t, args).output().unwrap();
    assert!(out.status.success(), "peer.py {args:?}: {}", stderr(&out));
    stdout(&out).trim().to_owned()
}

fn cachelock(t: &Target) -> Env {
    Env::with_backend(&t.url)
}

/// `cachelock --django status --json KEY`: (token, TTL in seconds).
fn status(env: &Env, k: &str) -> Option<(String, f64)> {
    let out = env.run(&["--django", "status", "--json", k]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    v["token"]
        .as_str()
        .map(|t| (t.to_owned(), v["ttl_s"].as_f64().unwrap_or(-1.0)))
}

fn wait_status(env: &Env, k: &str, what: &str, ok: impl Fn(&Option<(String, f64)>) -> bool) {
    let t = Instant::now();
    loop {
        let s = status(env, k);
        if ok(&s) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{k}: never {what} ({s:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count(dir: &std::path::Path, file: &str, who: &str) -> usize {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == who)
        .count()
}

/// ROUNDS rounds on each side at once, on one key: every entry into the
/// critical section is alone.
fn mutual_exclusion(t: &Target) {
    let k = key("django-contend");
    let marks = tempfile::tempdir().unwrap();
    let m = marks.path().to_str().unwrap().to_owned();
    let rounds = ROUNDS.to_string();
    let djblets = peer(t, &["contend", &k, &rounds, &m])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let env = cachelock(t);
    let started = Instant::now();
    for round in 0..ROUNDS {
        let out = env
            .cmd()
            .env("M", &m)
            .args([
                "--django",
                "run",
                "-w",
                "60",
                "--retry-interval",
                "10ms",
                &k,
                "--",
                "sh",
                "-c",
                CRITICAL,
            ])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}: {}",
            stderr(&out)
        );
    }
    let (out, _) = wait_output(djblets, Duration::from_secs(120));
    assert!(out.status.success(), "peer.py: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("done {ROUNDS}"));
    let (d, c) = (
        count(marks.path(), "entries", "djblets"),
        count(marks.path(), "entries", "cachelock"),
    );
    let overlaps =
        count(marks.path(), "overlaps", "djblets") + count(marks.path(), "overlaps", "cachelock");
    println!(
        "{}: djblets {d} rounds, cachelock {c} rounds, overlaps {overlaps}, in {:.1} s",
        t.cache,
        started.elapsed().as_secs_f64()
    );
    assert_eq!((d, c), (ROUNDS, ROUNDS));
    assert_eq!(overlaps, 0, "the two locks overlapped");
    assert_eq!(status(&env, &k), None, "a lock was left behind");
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn djblets_and_cachelock_exclude_each_other_on_redis() {
    let _ = NEEDS_SERVERS;
    mutual_exclusion(&redis());
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn djblets_and_cachelock_exclude_each_other_on_memcached() {
    mutual_exclusion(&memcached());
}

fn read_line(out: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.trim().to_owned()
}

/// djblets holds; cachelock sees its token, waits, cannot release it with
/// another token, and gets the lock soon after djblets releases its own.
fn hand_over(t: &Target) {
    let k = key("django-handover");
    let env = cachelock(t);
    let mut holder: Child = peer(t, &["hold", &k])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap());
    let held = read_line(&mut lines);
    let token = held.strip_prefix("held ").expect(&held).to_owned();
    // cachelock reads djblets' value (on Redis, Python's own pickle).
    assert_eq!(status(&env, &k).map(|s| s.0), Some(token.clone()));

    let ran = env.file("ran");
    let waiter = env
        .cmd()
        .args([
            "--django",
            "run",
            "-w",
            "30",
            "--retry-interval",
            "20ms",
            &k,
            "--",
            "sh",
            "-c",
            &format!("echo \"$CACHELOCK_TOKEN\" > {}", ran.display()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!ran.exists(), "cachelock ran while djblets held the lock");
    // An owner-checked release with another token leaves djblets' lock.
    let out = env.run(&["--django", "release", "--token", "not-djblets-token", &k]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(status(&env, &k).map(|s| s.0), Some(token.clone()));

    let released = Instant::now();
    holder
        .stdin
        .take()
        .unwrap()
        .write_all(b"release\n")
        .unwrap();
    assert_eq!(read_line(&mut lines), "released");
    let (out, _) = wait_output(waiter, Duration::from_secs(10));
    let took = released.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let ours = std::fs::read_to_string(&ran).unwrap();
    assert_ne!(ours.trim(), token);
    assert_eq!(ours.trim().len(), 36, "{ours:?}");
    println!(
        "{}: djblets released, cachelock ran and released {:.0} ms later",
        t.cache,
        took.as_secs_f64() * 1000.0
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(holder.wait().unwrap().success());
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn djblets_release_hands_over_to_a_waiting_cachelock_on_redis() {
    hand_over(&redis());
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn djblets_release_hands_over_to_a_waiting_cachelock_on_memcached() {
    hand_over(&memcached());
}

/// cachelock holds: Django reads the token as a `str`; djblets' release of
/// a lock it wrongly believes it holds deletes nothing, but its `touch`
/// stretches the key's TTL, until cachelock's next renewal puts its own
/// lease back (with the value still readable by Django).
fn foreign_release(t: &Target) {
    let k = key("django-foreign");
    let env = cachelock(t);
    let holder = env.spawn(&["--django", "run", "--lease", "3s", &k, "--", "sleep", "60"]);
    wait_status(&env, &k, "held", Option::is_some);
    let (token, _) = status(&env, &k).unwrap();
    assert_eq!(peer_output(t, &["get", &k]), format!("'{token}'"));

    let said = peer_output(t, &["foreign-release", &k, "300"]);
    let ttl: u64 = said
        .strip_prefix("done, ttl ")
        .expect(&said)
        .parse()
        .unwrap();
    println!("{}: TTL just after djblets' touch(300): {ttl} s", t.cache);
    assert!(ttl > 200, "touch did not stretch the TTL: {ttl}");
    let (after, _) = status(&env, &k).expect("djblets deleted cachelock's lock");
    assert_eq!(after, token);
    // Keep-alive renews every lease/3 = 1 s, back to the 3 s lease.
    wait_status(&env, &k, "renewed back to its lease", |s| {
        s.as_ref()
            .is_some_and(|(tok, ttl)| *tok == token && *ttl <= 3.5)
    });
    // The renewed value is still a str for Django (Memcached keeps flags 16).
    assert_eq!(peer_output(t, &["get", &k]), format!("'{token}'"));
    // SIGTERM goes to the command; cachelock releases.
    kill("TERM", holder.id());
    let (out, _) = wait_output(holder, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert_eq!(status(&env, &k), None);
    assert_eq!(peer_output(t, &["get", &k]), "None");
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn djblets_release_never_deletes_a_cachelock_lock_on_redis() {
    foreign_release(&redis());
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn djblets_release_never_deletes_a_cachelock_lock_on_memcached() {
    foreign_release(&memcached());
}

/// The key in Django mode: Django's `PREFIX:VERSION:`, then djblets' part
/// (`--namespace`, none by default), from the options or the environment.
#[test]
fn django_mode_builds_djangos_keys() {
    let env = Env::new();
    let out = env.run(&["--django", "status", "nightly"]);
    assert_eq!(stdout(&out).trim(), ":1:nightly: free", "{}", stderr(&out));
    let out = env.run(&[
        "--django",
        "--django-prefix",
        "app",
        "--django-version",
        "3",
        "--namespace",
        "example.com",
        "status",
        "nightly",
    ]);
    assert_eq!(stdout(&out).trim(), "app:3:example.com:nightly: free");
    let out = env
        .cmd()
        .env("CACHELOCK_COMPAT", "django")
        .args(["status", "nightly"])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), ":1:nightly: free");
    let out = env.run(&["status", "nightly"]);
    assert_eq!(stdout(&out).trim(), "cachelock:nightly: free");
}
