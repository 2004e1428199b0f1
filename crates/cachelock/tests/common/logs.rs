//! Captures cachelock's `tracing` events in a test, as text lines
//! `LEVEL message key=value ...`.

use std::io;
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::MakeWriter;

/// The captured lines; shared with the subscriber.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Every captured line.
    pub fn lines(&self) -> Vec<String> {
        let buf = self.0.lock().unwrap();
        String::from_utf8_lossy(&buf)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The lines at `level` (`"DEBUG"`, `"WARN"`, ...).
    pub fn at(&self, level: &str) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.starts_with(level))
            .collect()
    }

    /// Forgets what was captured so far.
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

pub struct Writer(Arc<Mutex<Vec<u8>>>);

impl io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = Writer;
    fn make_writer(&'a self) -> Writer {
        Writer(self.0.clone())
    }
}

/// Works around a race in tracing-core: a callsite first hit on one test
/// thread while another thread is installing its `capture()` dispatcher can
/// cache `Interest::never` and hide the second thread's events (seen as a
/// flaky `acquire_new_lock` on the SQLite backend, where tests take real
/// time). A global subscriber that is interested in everything (and writes
/// nowhere) keeps every callsite's interest above `never`; events still go
/// to each thread's own capture. Call it at the start of a test.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let sink = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(io::sink)
            .finish();
        let _ = tracing::subscriber::set_global_default(sink);
    });
}

/// Captures cachelock's events (DEBUG and up) on this thread until the
/// returned guard is dropped. Use it in current-thread runtimes.
pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
    init();
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_env_filter("cachelock=debug")
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    (logs, guard)
}
