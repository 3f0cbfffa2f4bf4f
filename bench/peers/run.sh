#!/usr/bin/env bash
# The engine against its peers (see bench/peers/README.md). Creates bench/peers/.venv with the
# peers' pinned requirements on first use, then runs the driver in the project's environment.
#   bench/peers/run.sh [--quick] [driver options, see --help]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
exec uv run --quiet python bench/peers/driver.py "$@"
