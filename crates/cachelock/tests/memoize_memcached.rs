//! The memoize and memoize_stream cases against three real Memcached
//! servers (real time).
mod common;

use std::sync::Arc;

use cachelock::SharedBackend;
use cachelock::backend::memcached::MemcachedBackend;

async fn servers() -> Option<SharedBackend> {
    let urls = common::server_env("CACHELOCK_TEST_MEMCACHED_URLS")?;
    let b = MemcachedBackend::connect(&urls)
        .await
        .expect("connect to the test memcacheds");
    Some(Arc::new(b))
}

mod values {
    use super::common;
    use crate::memoize_tests;
    memoize_tests!(super::servers().await, paused = false);
}

mod streams {
    use super::common;
    use crate::memoize_stream_tests;
    memoize_stream_tests!(super::servers().await, paused = false);
}

/// 4 processes x 16 callers on one cold key, compute 200 ms: the compute
/// runs once (counted in Memcached with `incr`), and every caller is
/// served soon after it. The processes are this test binary run again as
/// workers (`stampede_worker`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_across_processes_computes_once() {
    if servers().await.is_none() {
        return;
    }
    let key = common::unique_key("stampede");
    let counter = common::unique_key("stampede-computes");
    let start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 1_500;
    // 4 x 16 by default; CACHELOCK_STAMPEDE_PROCS / _TASKS change it for a
    // manual run (the benchmark is 16 processes).
    let num = |v: &str, d: usize| {
        std::env::var(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let (procs, tasks) = (
        num("CACHELOCK_STAMPEDE_PROCS", 4),
        num("CACHELOCK_STAMPEDE_TASKS", 16),
    );
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..procs)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "stampede_worker",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("CACHELOCK_STAMPEDE_WORKER", "1")
                .env("CACHELOCK_STAMPEDE_KEY", &key)
                .env("CACHELOCK_STAMPEDE_COUNTER", &counter)
                .env("CACHELOCK_STAMPEDE_START_MS", start_ms.to_string())
                .env("CACHELOCK_STAMPEDE_TASKS", tasks.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut served = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "worker failed: {out:?}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // The harness may print "test stampede_worker ... " on the same line.
            if let Some((_, ms)) = line.split_once("SERVED ") {
                served.push(ms.trim().parse::<u64>().unwrap());
            }
        }
    }
    assert_eq!(served.len(), procs * tasks, "{served:?}");
    let b = servers().await.unwrap();
    let computes = b.get(&counter).await.unwrap().unwrap();
    assert_eq!(&computes[..], b"1", "computes");
    served.sort_unstable();
    let (p50, max) = (served[served.len() / 2], served[served.len() - 1]);
    eprintln!(
        "stampede {procs} processes x {tasks} callers, compute 200 ms: 1 compute, p50 {p50} ms, max {max} ms"
    );
    // Goal 225 ms; the assertion leaves room for a loaded 2-core test machine.
    assert!(max < 200 + 150, "slowest caller served after {max} ms");
}

/// One worker process of `stampede_across_processes_computes_once`; does
/// nothing when run as a normal test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_worker() {
    if std::env::var("CACHELOCK_STAMPEDE_WORKER").is_err() {
        return;
    }
    let env = |v: &str| std::env::var(v).unwrap();
    let (key, counter) = (
        env("CACHELOCK_STAMPEDE_KEY"),
        env("CACHELOCK_STAMPEDE_COUNTER"),
    );
    let start = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(env("CACHELOCK_STAMPEDE_START_MS").parse().unwrap());
    let b = servers().await.unwrap();
    let o = cachelock::MemoizeOptions::new().lock(
        cachelock::LockOptions::new()
            .wait(cachelock::Wait::Timeout(std::time::Duration::from_secs(10))),
    );
    if let Ok(wait) = start.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    let n: usize = env("CACHELOCK_STAMPEDE_TASKS").parse().unwrap();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (b, key, counter, o) = (b.clone(), key.clone(), counter.clone(), o.clone());
            tokio::spawn(async move {
                let v: String = cachelock::memoize(&b, key.as_str(), &o, || async {
                    let began = std::time::SystemTime::now()
                        .duration_since(start)
                        .unwrap_or_default();
                    eprintln!(
                        "compute started {} ms after the common start",
                        began.as_millis()
                    );
                    b.incr(&counter, 1).await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    Ok::<_, std::io::Error>("computed".to_string())
                })
                .await
                .unwrap();
                assert_eq!(v, "computed");
                std::time::SystemTime::now()
                    .duration_since(start)
                    .unwrap()
                    .as_millis()
            })
        })
        .collect();
    for t in tasks {
        println!("SERVED {}", t.await.unwrap());
    }
}
