#!/usr/bin/env bash
# `rca serve`: the pipeline and stage flows as deployments on a Prefect server, so that runs are started from
# the Prefect UI. Each flow run executes in a subprocess of this process and is the Ray driver, so run this ON
# the Ray head node (ray.address=auto: no Ray Client), e.g. in tmux:
#   ray exec deploy/ray-cluster.yaml --tmux 'cd ~/rca && RAY_ADDRESS=auto deploy/serve.sh configs/demo.yaml demo \
#       --set store=s3://my-rca-bucket/runs/demo --set data.root=s3://my-rca-bucket/data/demo'
# Usage: [PREFECT_API_URL=...] [RAY_ADDRESS=auto] deploy/serve.sh [CONFIG [NAME [more `rca serve` options ...]]]
# Variables:
#   PREFECT_API_URL  the Prefect server's API; default http://127.0.0.1:4200/api (deploy/prefect-server.sh on
#                    this machine; KubeRay: http://rca-prefect:4200/api, set in the manifest).
#   RAY_ADDRESS      becomes `--set ray.address=...`: `auto` on a cluster node (a cluster started with `ray start`
#                    or KubeRay); unset: every flow run starts its own local Ray.
# The config's values are the defaults of the UI's run form (Deployments -> rca-pipeline/NAME -> Run ->
# Custom run); store and data.root can be changed there per run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
config="${1:-configs/demo.yaml}"; name="${2:-demo}"
shift $(( $# < 2 ? $# : 2 ))
extra=()
[ -n "${RAY_ADDRESS:-}" ] && extra+=(--set "ray.address=$RAY_ADDRESS")
rca_bin="$(command -v rca || echo .venv/bin/rca)"
exec "$rca_bin" serve --config "$config" --name "$name" ${extra[@]+"${extra[@]}"} "$@"
