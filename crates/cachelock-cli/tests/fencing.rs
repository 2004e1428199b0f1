//! Fencing numbers rise in grant order: 8 worker processes of `bench
//! contended --check` stamp each critical section on CLOCK_MONOTONIC with
//! its guard's fence; taken in the order the sections began, every fence
//! must be above the one before, on every backend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, server_env, server_url, stderr, stdout};

fn fences_rise(env: &Env, procs: &str) {
    let out = env.run(&[
        "bench",
        "contended",
        "--procs",
        procs,
        "--duration",
        "1s",
        "--check",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert!(v["acquisitions"].as_u64().unwrap() > 16, "{v}");
    assert_eq!(v["overlaps"], 0, "{v}");
    assert_eq!(v["fence_regressions"], 0, "{v}");
}

#[test]
fn fences_rise_in_grant_order_on_the_embedded_default() {
    fences_rise(&Env::new(), "8");
}

#[test]
fn fences_rise_in_grant_order_on_memory() {
    fences_rise(&Env::with_backend("memory://"), "8");
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn fences_rise_in_grant_order_on_redis() {
    fences_rise(&server_env("CACHELOCK_TEST_REDIS_URL"), "8");
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn fences_rise_in_grant_order_on_redis_cluster() {
    let urls = server_url("CACHELOCK_TEST_REDIS_CLUSTER_URLS");
    let hosts: Vec<&str> = urls
        .split(',')
        .map(|u| u.trim().trim_start_matches("redis://"))
        .collect();
    fences_rise(
        &Env::with_backend(&format!("redis+cluster://{}", hosts.join(","))),
        "8",
    );
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn fences_rise_in_grant_order_on_memcached() {
    fences_rise(&server_env("CACHELOCK_TEST_MEMCACHED_URLS"), "8");
}
