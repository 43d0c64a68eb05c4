#!/usr/bin/env bash
# The test command: sets up .venv (first run: a few minutes) and runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k store`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/venv.sh test
source scripts/env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 --durations=30 "$@"
