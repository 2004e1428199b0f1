#!/usr/bin/env python3
"""The peer for `cachelock bench contended`: python-redis-lock on the same
workload (P processes loop for D seconds: blocking acquire at the library's
default settings, a non-atomic read-modify-write of a counter in Redis,
release). Prints one JSON line with acquisitions/s, per-worker min/max and
violations (lost increments), like `cachelock bench contended --json`.

Run it through peers/run_python_redis_lock.sh, which makes a venv under /tmp
with `python-redis-lock` and `redis`. Not run by scripts/test.

    python_redis_lock.py --url redis://127.0.0.1:6379/0 --procs 8 --duration 5
"""
import argparse
import json
import multiprocessing as mp
import os
import time

import redis
import redis_lock


def worker(url, name, counter, duration, start_at, out):
    conn = redis.Redis.from_url(url)
    lock = redis_lock.Lock(conn, name, expire=30)
    n = 0
    while time.time() < start_at:
        time.sleep(0.001)
    end = start_at + duration
    while time.time() < end:
        lock.acquire(blocking=True)
        v = int(conn.get(counter) or 0)
        conn.set(counter, v + 1)
        lock.release()
        n += 1
    out.put(n)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default=os.environ.get("CACHELOCK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--procs", type=int, default=8)
    p.add_argument("--duration", type=float, default=5.0)
    a = p.parse_args()
    tag = f"peer:{os.getpid()}:{time.time_ns()}"
    name, counter = f"{tag}:lock", f"{tag}:counter"
    out = mp.Queue()
    start_at = time.time() + 1.0
    procs = [mp.Process(target=worker, args=(a.url, name, counter, a.duration, start_at, out)) for _ in range(a.procs)]
    for pr in procs:
        pr.start()
    counts = [out.get() for _ in procs]
    for pr in procs:
        pr.join()
    seconds = time.time() - start_at
    total = sum(counts)
    stored = int(redis.Redis.from_url(a.url).get(counter) or 0)
    print(json.dumps({
        "workload": "contended",
        "peer": "python-redis-lock",
        "procs": a.procs,
        "seconds": round(seconds, 3),
        "acquisitions": total,
        "acq_per_s": round(total / seconds),
        "violations": total - stored,
        "per_worker_min": min(counts),
        "per_worker_max": max(counts),
        "fairness": round(min(counts) / max(counts), 3) if max(counts) else 0,
    }))


if __name__ == "__main__":
    main()
