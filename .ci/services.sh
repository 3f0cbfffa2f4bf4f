#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer on 127.0.0.1; start them if this machine has them
# but they stopped; fail loudly otherwise.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_up() {
  for _ in $(seq 1 50); do up "$1" && return 0; sleep 0.2; done
  return 1
}

if ! up 5432; then
  echo "PostgreSQL is not answering on 127.0.0.1:5432; trying to start it" >&2
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
  fi
  wait_up 5432 || { echo "FATAL: PostgreSQL is required (127.0.0.1:5432)" >&2; exit 1; }
fi

if ! up 6379; then
  echo "Redis is not answering on 127.0.0.1:6379; trying to start it" >&2
  if command -v redis-server >/dev/null; then
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
      --appendonly no --dir /tmp --logfile /tmp/alpaca-ci-redis.log || true
  fi
  wait_up 6379 || { echo "FATAL: Redis is required (127.0.0.1:6379)" >&2; exit 1; }
fi
echo "services: PostgreSQL and Redis are up"
