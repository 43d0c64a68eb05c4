#!/usr/bin/env bash
# The main job: sets up .venv, then runs the whole pipeline on the built-in demo data set with a
# local Ray and a local Prefect server (SQLite), prints the per-stage table and where the outputs are.
# Extra arguments go to `rca run`, e.g. `bash scripts/main.sh --config configs/tiny.yaml`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/venv.sh
source scripts/env.sh
exec .venv/bin/rca run "$@"
