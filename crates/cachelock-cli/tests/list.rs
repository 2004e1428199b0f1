//! `cachelock list [PREFIX]` as a user runs it: the built binary on the
//! embedded default (SQLite) and, in the `#[ignore]`d tests that
//! `scripts/test` runs, on the test Redis, Redis Cluster and Memcached.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Child;
use std::time::Duration;

use common::{Env, key, server_env, server_url, stderr, stdout, wait_output};

/// Two holders under one prefix and one under another: `list PREFIX` shows
/// exactly the first two (text and JSON, with TTL, holder and fence), the
/// fence counters are not listed, and once released nothing is.
fn lists_held_locks(env: &Env) {
    let prefix = key("list");
    let (a, b, other) = (
        format!("{prefix}:a"),
        format!("{prefix}:b"),
        key("list-other"),
    );
    let holders: Vec<(String, Child)> = [&a, &b, &other]
        .into_iter()
        .map(|k| {
            let child = env.spawn(&["run", k, "--", "sleep", "30"]);
            env.wait_held(k);
            (k.clone(), child)
        })
        .collect();

    let out = env.run(&["list", &prefix]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for (k, child) in &holders[..2] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("cachelock:{k}: held by token")))
            .unwrap_or_else(|| panic!("{k} not listed: {text}"));
        assert!(
            line.contains("expires in") && line.contains("fence "),
            "{line}"
        );
        assert!(text.contains(&format!("pid {}", child.id())), "{text}");
    }
    assert!(!text.contains(&other), "{text}");
    assert!(
        !text.contains(":fence"),
        "fence counters are not locks: {text}"
    );
    assert!(text.contains("command sleep 30"), "{text}");

    let out = env.run(&["list", "--json", &prefix]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let locks = v["locks"].as_array().unwrap();
    let keys: Vec<&str> = locks.iter().map(|l| l["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        [format!("cachelock:{a}"), format!("cachelock:{b}")],
        "{v}"
    );
    for (l, (_, child)) in locks.iter().zip(&holders) {
        assert_eq!(l["token"].as_str().unwrap().len(), 36, "{l}");
        assert!(l["fence"].as_u64().is_some_and(|f| f > 0), "{l}");
        assert!(l["ttl_s"].as_f64().is_some_and(|t| t > 0.0), "{l}");
        assert_eq!(l["holder"]["pid"], child.id(), "{l}");
    }
    assert_eq!(v["truncated"], false, "{v}");

    // --limit 1: one shown, and it says there are more.
    let out = env.run(&["list", "--json", "--limit", "1", &prefix]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["locks"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["truncated"], true, "{v}");

    for (k, child) in holders {
        common::kill("TERM", child.id());
        let (out, _) = wait_output(child, Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(143), "{k}: {}", stderr(&out));
    }
    let out = env.run(&["list", &prefix]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("no locks held"), "{}", stdout(&out));
    let out = env.run(&["list", "--json", &prefix]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["locks"], serde_json::json!([]), "{v}");
}

#[test]
fn list_on_sqlite() {
    lists_held_locks(&Env::new());
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn list_on_redis() {
    lists_held_locks(&server_env("CACHELOCK_TEST_REDIS_URL"));
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn list_on_redis_cluster() {
    let urls = server_url("CACHELOCK_TEST_REDIS_CLUSTER_URLS");
    let hosts: Vec<&str> = urls
        .split(',')
        .map(|u| u.trim().trim_start_matches("redis://"))
        .collect();
    let env = Env::with_backend(&format!("redis+cluster://{}", hosts.join(",")));
    // Enough locks that every master holds some (SCAN must visit them all).
    let prefix = key("list-cluster");
    let keys: Vec<String> = (0..12).map(|i| format!("{prefix}:{i}")).collect();
    let holders: Vec<Child> = keys
        .iter()
        .map(|k| env.spawn(&["run", k, "--", "sleep", "30"]))
        .collect();
    for k in &keys {
        env.wait_held(k);
    }
    let out = env.run(&["list", "--json", &prefix]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let mut listed: Vec<String> = v["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["key"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    let mut want: Vec<String> = keys.iter().map(|k| format!("cachelock:{k}")).collect();
    want.sort();
    assert_eq!(listed, want, "{v}");
    for child in holders {
        common::kill("TERM", child.id());
        let _ = wait_output(child, Duration::from_secs(10));
    }
    lists_held_locks(&env);
}

#[test]
#[ignore = "needs the test servers: scripts/test"]
fn list_on_memcached_says_it_cannot() {
    let env = server_env("CACHELOCK_TEST_MEMCACHED_URLS");
    let holder = env.spawn(&["run", &key("list-mc"), "--", "sleep", "30"]);
    for args in [&["list"][..], &["list", "--json", "cli-test"][..]] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        assert!(
            stdout(&out).is_empty(),
            "not an empty list: {}",
            stdout(&out)
        );
        let err = stderr(&out);
        assert!(
            err.contains("memcached cannot list its keys") && err.contains("cachelock status"),
            "{err}"
        );
    }
    common::kill("TERM", holder.id());
    let _ = wait_output(holder, Duration::from_secs(10));
}

#[test]
fn list_refuses_memory_and_shows_in_help() {
    let env = Env::with_backend("memory://");
    let out = env.run(&["list"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("memory://"), "{}", stderr(&out));
    let help = Env::new().run(&["--help"]);
    assert!(stdout(&help).contains("list"), "{}", stdout(&help));
    let help = Env::new().run(&["list", "--help"]);
    assert!(stdout(&help).contains("PREFIX"), "{}", stdout(&help));
}
