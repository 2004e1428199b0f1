#!/bin/sh
# Runs the python-redis-lock peer (python_redis_lock.py) from a venv under
# /tmp, made on first use: `pip install python-redis-lock redis`.
# Arguments are passed on (--url, --procs, --duration). Not run by scripts/test.
set -eu
venv=${CACHELOCK_PEER_VENV:-/tmp/cachelock-peer-venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet python-redis-lock redis
fi
exec "$venv/bin/python" "$(dirname "$0")/python_redis_lock.py" "$@"
