//! What the CLI tests share: the built binary in a private environment,
//! unique keys, output helpers, the test servers' URLs and a fault proxy.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod proxy;

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cachelock");

/// The reason given on every test that needs the test servers.
pub const NEEDS_SERVERS: &str = "needs the test servers: scripts/test";

/// One test's private environment: its own cache dir (so the default SQLite
/// file is private) and optionally a backend URL.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub backend: Option<String>,
}

impl Env {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            backend: None,
        }
    }

    pub fn with_backend(url: &str) -> Self {
        Self {
            backend: Some(url.to_owned()),
            ..Self::new()
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("XDG_CACHE_HOME", self.dir.path())
            .env_remove("CACHELOCK_BACKEND")
            .env_remove("CACHELOCK_NAMESPACE")
            .env_remove("CACHELOCK_LOG")
            .env_remove("CACHELOCK_TLS_CA")
            .env_remove("NO_COLOR");
        if let Some(b) = &self.backend {
            c.env("CACHELOCK_BACKEND", b);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Starts `cachelock ARGS` in the background.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits (up to 10 s) until `status KEY` says held.
    pub fn wait_held(&self, key: &str) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if self.run(&["status", key]).status.code() == Some(0) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{key} was never held");
    }

    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A key no other test (or run) uses.
pub fn key(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "cli-test:{name}:{}:{}:{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Waits for a background child, at most `limit` (then kills it and fails).
pub fn wait_output(child: Child, limit: Duration) -> (Output, Duration) {
    let t = Instant::now();
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(limit);
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let out = child.wait_with_output().unwrap();
    let took = t.elapsed();
    assert!(
        took < limit,
        "the process did not end within {limit:?}: {}",
        stderr(&out)
    );
    drop(watchdog);
    (out, took)
}

/// Sends `sig` (e.g. "TERM") to `pid`.
pub fn kill(sig: &str, pid: u32) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// Whether process `pid` still runs (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
    }
}

/// Waits (up to 10 s) until `path` has a line, and returns its first line.
pub fn wait_line(path: &std::path::Path) -> String {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Some(line) = s.lines().next()
            && s.ends_with('\n')
        {
            return line.to_owned();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} was never written", path.display());
}

/// The URL of a test server, from the environment `scripts/services` wrote.
/// Such tests are `#[ignore]`d in a plain `cargo test` and run by
/// `scripts/test`, so a missing server fails the test, never skips it.
pub fn server_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{var} is not set: run scripts/test, or scripts/services start and \
             source <(scripts/services env)"
        ),
    }
}

/// The first `host:port` of a test server URL (`redis://127.0.0.1:P`,
/// `memcached://127.0.0.1:P1,...`).
pub fn first_addr(url: &str) -> std::net::SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let first = rest.split(',').next().unwrap().trim_end_matches('/');
    first.parse().unwrap()
}

/// An environment on the test server at `var`, checked to answer.
pub fn server_env(var: &str) -> Env {
    let url = server_url(var);
    let env = Env::with_backend(&url);
    let out = env.run(&["status", &key("probe")]);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{url}: {}",
        stderr(&out)
    );
    env
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, what: &str) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(5), "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A private server process on a free port, killed when dropped.
pub struct PrivateServer {
    pub child: Child,
    pub port: u16,
}

impl PrivateServer {
    /// A Memcached of its own (to kill under a running command).
    pub fn memcached() -> Self {
        let port = free_port();
        let mut cmd = Command::new("memcached");
        cmd.args([
            "-l",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "0",
            "-m",
            "16",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if is_root() {
            cmd.args(["-u", "root"]);
        }
        let child = cmd
            .spawn()
            .expect("memcached is not installed (scripts/services installs it)");
        wait_port(port, "memcached");
        Self { child, port }
    }

    /// A Redis of its own on `port` (`None`: a free one), no persistence.
    pub fn redis(port: Option<u16>) -> Self {
        let port = port.unwrap_or_else(free_port);
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed (scripts/services installs it)");
        wait_port(port, "redis-server");
        Self { child, port }
    }

    /// A Redis of its own that wants `password`.
    pub fn redis_with_password(password: &str) -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                password,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed (scripts/services installs it)");
        wait_port(port, "redis-server");
        Self { child, port }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
