#!/usr/bin/env bash
# The test command: installs what the suite needs on a fresh machine (uv, the locked Python
# dependencies, Debian's Chromium for the web-page test), then runs every test.
# Extra arguments go to pytest. The suite runs on ALPACA_TEST_JOBS pytest-xdist workers (3:
# most tests wait on processes, browsers and servers more than they compute; 0 runs it
# serially in this process).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet uv

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser test" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium is not installed (apt-get install chromium); the browser test" \
         "is skipped, and fails under CI=true" >&2
  fi
fi

# Bytecode compiled once, here: where PYTHONDONTWRITEBYTECODE is set (CI images and this
# machine set it) Python writes no .pyc of its own, so each `alpaca` process the end-to-end
# tests start compiled every module again: 1.2 s to import the CLI instead of 0.6 s.
uv sync --compile-bytecode --quiet
uv run python -m compileall -q src >/dev/null

exec uv run pytest -n "${ALPACA_TEST_JOBS:-3}" --dist worksteal "$@"
