//! Private servers owned by one test: a `redis-server` or a `memcached` on
//! a free loopback port, killed (and its directory removed) when the guard
//! is dropped. Tests that kill, restart or fill a server use these, never
//! the shared test servers.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nobody listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}

/// Fails the test unless `program --version` runs (`scripts/services start`
/// installs the server programs).
fn require(program: &str) {
    let ok = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        ok,
        "{program} is not installed: this test needs the test servers; run it through scripts/test"
    );
}

/// Waits until something accepts connections on `port` (at most `limit`).
fn wait_for_port(port: u16, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} on {port} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A `redis-server` owned by one test: its own port and directory, no
/// persistence; killed (and its directory removed) on drop.
pub struct PrivateRedis {
    pub port: u16,
    pub dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts a server (the test fails when `redis-server` is not installed).
    pub fn start(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_with(move |_, _| extra)
    }

    /// As [`start`](Self::start), with arguments made from the port and the
    /// server's directory (after the directory exists).
    pub fn start_with(extra: impl FnOnce(u16, &Path) -> Vec<String>) -> Self {
        require("redis-server");
        let dir = std::env::temp_dir().join(super::unique_key("redis").replace(':', "-"));
        std::fs::create_dir_all(&dir).expect("create the server directory");
        let port = closed_port();
        let extra = extra(port, &dir);
        let mut server = Self {
            port,
            dir,
            extra,
            child: None,
        };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// Starts the server process (again) on the same port and directory and
    /// waits until it answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .arg("--unixsocket")
            .arg(self.socket())
            .args(["--unixsocketperm", "700", "--logfile"])
            .arg(self.dir.join("redis.log"))
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10), "private redis-server");
    }

    /// Kills the server process (SIGKILL: no save, no goodbye).
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Kills the server and starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `memcached` owned by one test, on a port of its own, killed on drop.
pub struct PrivateMemcached {
    pub port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl PrivateMemcached {
    /// Starts a memcached with 16 MB of memory on `port`.
    pub fn start(port: u16) -> Self {
        Self::start_with(port, &["-m", "16"])
    }

    /// Starts a memcached on `port` with extra arguments (`-m`, `-I`, `-M`...)
    /// (the test fails when `memcached` is not installed).
    pub fn start_with(port: u16, extra: &[&str]) -> Self {
        require("memcached");
        let mut server = Self {
            port,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.spawn();
        server
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("memcached://127.0.0.1:{}", self.port)
    }

    /// Starts the process (again) on the same port and waits until it
    /// accepts connections.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let mut cmd = Command::new("memcached");
        cmd.args(["-l", "127.0.0.1", "-U", "0", "-p"])
            .arg(self.port.to_string())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        if root {
            cmd.args(["-u", "nobody"]);
        }
        self.child = Some(cmd.spawn().expect("start memcached"));
        wait_for_port(self.port, Duration::from_secs(5), "memcached");
    }

    /// Kills the process.
    pub fn stop(&mut self) {
        kill_child(&mut self.child);
    }

    /// Kills the server and starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for PrivateMemcached {
    fn drop(&mut self) {
        self.stop();
    }
}
