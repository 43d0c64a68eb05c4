#!/usr/bin/env bash
# The serve process against a Prefect server and a Ray cluster. Usage:
#   PREFECT_API_URL=http://prefect:4200/api RAY_ADDRESS=ray://ray-head:10001 deploy/serve.sh configs/voc12.yaml voc12
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server API, e.g. http://prefect:4200/api}"
config="${1:-configs/demo.yaml}"; name="${2:-demo}"
extra=()
[ -n "${RAY_ADDRESS:-}" ] && extra+=(--set "ray.address=$RAY_ADDRESS")
source scripts/env.sh
exec .venv/bin/rca serve --config "$config" --name "$name" "${extra[@]}"
