#!/usr/bin/env bash
# Everything on this machine, for the UI: a Prefect server on 127.0.0.1:4200 and `rca serve`.
# Open http://127.0.0.1:4200, Deployments -> rca-pipeline/demo -> Run. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/venv.sh
source scripts/env.sh
mkdir -p runs/prefect
export PREFECT_HOME="$PWD/runs/prefect" PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_UI_API_URL=http://127.0.0.1:4200/api
.venv/bin/prefect server start --host 127.0.0.1 --port 4200 > runs/prefect-server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
until curl -sf http://127.0.0.1:4200/api/health >/dev/null; do sleep 1; done
echo "Prefect UI: http://127.0.0.1:4200"
.venv/bin/rca serve --config "${1:-configs/demo.yaml}"
