//! The library and the command share keys: a lock taken with
//! `Cache::lock` is seen by `cachelock status`, and one held by
//! `cachelock run` is held for the library (issue 9: one default
//! namespace, `cachelock`, in both).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cachelock");

fn cachelock(url: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.env("CACHELOCK_BACKEND", url)
        .env_remove("CACHELOCK_NAMESPACE")
        .env_remove("CACHELOCK_LOG")
        .args(args);
    c
}

fn status(url: &str, key: &str) -> Output {
    cachelock(url, &["status", key]).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_and_command_see_each_others_locks() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("locks.sqlite3").display());
    let cache = cachelock::Cache::connect(&url).await.unwrap();
    let key = format!("interop-{}", std::process::id());

    // Taken by the library, seen by `cachelock status` (exit 0: held).
    let guard = cache.lock(key.as_str()).try_acquire().await.unwrap();
    assert_eq!(guard.key(), format!("cachelock:{key}"));
    let out = status(&url, &key);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(guard.token()), "{text}");
    let _ = guard.release().await.unwrap();
    assert_eq!(
        status(&url, &key).status.code(),
        Some(1),
        "free after release"
    );

    // Held by `cachelock run`, held for the library.
    let mut run = cachelock(&url, &["run", &key, "--", "sleep", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while status(&url, &key).status.code() != Some(0) {
        assert!(t.elapsed() < Duration::from_secs(10), "never held");
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = cache.lock(key.as_str()).try_acquire().await.unwrap_err();
    assert!(err.is_held(), "{err:?}");
    // SIGTERM: forwarded to the command; the lock is released.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(run.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    run.wait().unwrap();
    assert!(cache.lock(key.as_str()).try_acquire().await.is_ok());
    cache.close().await;
}
