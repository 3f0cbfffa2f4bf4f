#!/usr/bin/env bash
# The package with only what pyproject.toml declares: plain `pip install .` into a fresh venv
# (no uv, no lock), then `alpaca demo` and `alpaca chat` in an empty directory. Fails loudly, with the output.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python3 -m venv "$tmp/venv"
if ! "$tmp/venv/bin/python" -m pip install --quiet "$root" >"$tmp/pip.log" 2>&1; then
  cat "$tmp/pip.log" >&2
  echo "FATAL: pip install . failed in a fresh venv (log above)" >&2
  exit 1
fi

mkdir "$tmp/work"
if ! (cd "$tmp/work" && "$tmp/venv/bin/alpaca" demo </dev/null >"$tmp/demo.log" 2>&1); then
  cat "$tmp/demo.log" >&2
  echo "FATAL: alpaca demo failed after a plain pip install (output above); declare what" \
       "the code imports in pyproject.toml [project.dependencies]" >&2
  exit 1
fi
if ! grep -q "chains verified" "$tmp/demo.log"; then
  cat "$tmp/demo.log" >&2
  echo "FATAL: alpaca demo exited 0 after a plain pip install but did not verify its audit" >&2
  exit 1
fi
if ! (cd "$tmp/work" && printf 'My name is Ada.\nWhat is my name?\n' |
        "$tmp/venv/bin/alpaca" chat --agent assistant >"$tmp/chat.log" 2>&1) ||
   ! grep -q "Your name is Ada." "$tmp/chat.log"; then
  cat "$tmp/chat.log" >&2
  echo "FATAL: alpaca chat did not remember the name after a plain pip install (output above)" >&2
  exit 1
fi
echo "pip install: a fresh venv installs the package and runs alpaca demo and alpaca chat"
