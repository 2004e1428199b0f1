"""The djblets side of the Django interop tests (crates/cachelock-cli/tests/django.rs).

Runs djblets' own ``CacheLock`` (djblets 6.1) on Django's cache pointed at the
test Redis or Memcached, against a cachelock holder on the same key:

  peer.py CACHE LOCATION contend KEY ROUNDS MARKER_DIR
      ROUNDS times: take the lock (blocking), run the critical section
      (see critical()), release.  Prints "done N".
  peer.py CACHE LOCATION hold KEY
      Takes the lock, prints "held TOKEN", waits for a line on stdin,
      releases, prints "released".
  peer.py CACHE LOCATION get KEY
      Prints repr(cache.get(KEY)): what Django reads under the full key.
  peer.py CACHE LOCATION foreign-release KEY SECS
      djblets' release() of a lock it believes it holds (acquired with
      another token, SECS of expiration) while someone else holds KEY:
      touch, get, compare, and (on a match only) delete.  Prints "done, ttl
      N": the key's TTL on the server just after.

CACHE is "redis" (LOCATION redis://host:port) or "memcached" (LOCATION
host:port).  KEY is djblets' key; with no sites app Django's full key is
":1:KEY".
"""

import os
import sys
import time


def setup(cache, location):
    import django
    from django.conf import settings

    backend = {
        "redis": "django.core.cache.backends.redis.RedisCache",
        "memcached": "django.core.cache.backends.memcached.PyMemcacheCache",
    }[cache]
    settings.configure(
        SECRET_KEY="cachelock-interop-test",
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.sites"],
        DATABASES={},
        CACHES={"default": {"BACKEND": backend, "LOCATION": location}},
        USE_TZ=True,
    )
    django.setup()


def critical(marker_dir):
    """The critical section: a marker file that must not exist on entry."""
    inside = os.path.join(marker_dir, "inside")
    try:
        fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
    except FileExistsError:
        with open(os.path.join(marker_dir, "overlaps"), "a") as f:
            f.write("djblets\n")
    with open(os.path.join(marker_dir, "entries"), "a") as f:
        f.write("djblets\n")
    time.sleep(0.02)
    try:
        os.unlink(inside)
    except FileNotFoundError:
        pass


def server_ttl(cache_name, location, full_key):
    """The key's remaining TTL in whole seconds, asked of the server itself
    right away (Django's cache API cannot tell)."""
    import socket

    if cache_name == "redis":
        import redis

        return redis.Redis.from_url(location).ttl(full_key)
    host, port = location.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"mg " + full_key.encode() + b" t\r\n")
        reply = s.recv(256).decode()
    for flag in reply.split()[1:]:
        if flag.startswith("t"):
            return int(flag[1:])
    return None


def main(argv):
    cache_name, location, mode, key = argv[1:5]
    setup(cache_name, location)
    from django.core.cache import cache
    from djblets.cache.backend import make_cache_key
    from djblets.protect.locks import CacheLock

    # No sites app in use: djblets' key is the key itself.
    assert make_cache_key(key) == key, make_cache_key(key)
    if mode == "contend":
        rounds, marker_dir = int(argv[5]), argv[6]
        for _ in range(rounds):
            lock = CacheLock(key, lock_expiration_secs=10, retry_secs=0.005)
            lock.acquire()
            critical(marker_dir)
            lock.release()
            # Give the other side a chance, as a job would between runs.
            time.sleep(0.005)
        print(f"done {rounds}", flush=True)
    elif mode == "hold":
        lock = CacheLock(key, lock_expiration_secs=30, retry_secs=0.01)
        lock.acquire()
        print(f"held {lock.token}", flush=True)
        sys.stdin.readline()
        lock.release()
        print("released", flush=True)
    elif mode == "get":
        print(repr(cache.get(key)), flush=True)
    elif mode == "foreign-release":
        secs = int(argv[5])
        lock = CacheLock(key, lock_expiration_secs=secs)
        # As if this process had taken the lock and lost it to the other
        # holder: djblets still believes it holds it.
        lock.acquired = True
        lock.token = "not-the-holders-token"
        lock._lock_expires_time = time.monotonic() + secs
        lock.release()
        print(f"done, ttl {server_ttl(cache_name, location, cache.make_key(key))}", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv)
