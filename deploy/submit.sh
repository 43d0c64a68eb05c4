#!/usr/bin/env bash
# Submit one pipeline run to a Ray cluster through Ray Jobs. The job's entrypoint (`rca run`) runs on the
# head node: it is the Ray driver (ray.address=auto, no Ray Client) and the only process that talks to
# Prefect. Run this from the repository on your machine, with the cluster's dashboard reachable (a tunnel:
# `ray dashboard deploy/ray-cluster.yaml`, or `kubectl port-forward svc/rca-wsss-head-svc 8265:8265`).
#
# Usage:
#   RCA_STORE=s3://BUCKET/rca/voc12 deploy/submit.sh CONFIG [more `rca run` options ...]
# e.g.
#   RCA_STORE=s3://my-rca-bucket/runs/demo deploy/submit.sh configs/demo.yaml --set data.root=s3://my-rca-bucket/data/demo
#
# Variables (all optional except RCA_STORE):
#   RCA_STORE            artifact store URL, passed as `--set store=...` (required; s3://bucket/prefix)
#   RAY_API_SERVER_ADDRESS  the Ray Jobs (dashboard) address as seen from here; default http://127.0.0.1:8265
#                        (the tunnel). RAY_ADDRESS is NOT used for this: in a driver it means something else.
#   RAY_AUTH_MODE        token (default): the cluster runs with Ray token auth; `disabled` only for a cluster
#                        you started without auth on loopback.
#   RAY_AUTH_TOKEN_PATH  file with the cluster's token; default ~/.rca/cluster/ray_auth_token (the file that
#                        deploy/ray-cluster.yaml copies to every node). Or set RAY_AUTH_TOKEN to the token itself
#                        (KubeRay: `kubectl get secret rca-ray-token -o jsonpath='{.data.auth_token}' | base64 -d`).
#   RCA_REMOTE_DIR       the repository on the head node, where the job runs; default /home/ubuntu/rca
#                        (deploy/ray-cluster.yaml); /app in the KubeRay image (deploy/Dockerfile).
#   RCA_PREFECT_API_URL  PREFECT_API_URL for the driver, as seen from the head node; default
#                        http://127.0.0.1:4200/api (the server deploy/prefect-server.sh starts on the head; KubeRay:
#                        http://rca-prefect:4200/api). `none`: no server, `rca run` starts a throw-away local one.
#   RCA_JOB_ID           the job's submission id; default rca-<config file name>-<YYYYmmdd-HHMMSS>
#   RCA_WAIT             1: stream the job's logs here until the run ends and exit with its status;
#                        0 (default): return at once and print the commands that follow it.
#   RCA_PROGRESS_INTERVAL  seconds between progress lines in the job's log (default 30).
#   RAY_BIN              the `ray` command; default: `ray` on PATH, else .venv/bin/ray.
# Never pass env_vars in --runtime-env-json for this job: the driver sets its workers' env_vars itself and Ray
# refuses a job whose runtime_env and the driver's name the same variable. Credentials are not sent with the
# job: every node (and the head, where the driver runs) has its own (instance profile / Secret / env).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
config="$1"; shift
: "${RCA_STORE:?set RCA_STORE to the artifact store URL, e.g. RCA_STORE=s3://my-rca-bucket/runs/demo}"
[ -f "$config" ] || { echo "submit.sh: config $config not found here (the path must also exist under RCA_REMOTE_DIR on the head)" >&2; exit 2; }

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HOME/.rca/cluster/ray_auth_token}"
  [ -s "$RAY_AUTH_TOKEN_PATH" ] || { echo "submit.sh: no Ray auth token at $RAY_AUTH_TOKEN_PATH (set RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)" >&2; exit 2; }
fi
address="${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}"
remote_dir="${RCA_REMOTE_DIR:-/home/ubuntu/rca}"
prefect="${RCA_PREFECT_API_URL:-http://127.0.0.1:4200/api}"
job_id="${RCA_JOB_ID:-rca-$(basename "${config%.*}")-$(date +%Y%m%d-%H%M%S)}"
ray_bin="${RAY_BIN:-$(command -v ray || echo .venv/bin/ray)}"

# The entrypoint: one shell command line, every word quoted.
cmd=(rca run --config "$config" --set "store=$RCA_STORE" --set ray.address=auto "$@")
env_words=(env "RCA_PROGRESS_INTERVAL=${RCA_PROGRESS_INTERVAL:-30}")
if [ "$prefect" = none ]; then env_words+=(-u PREFECT_API_URL); else env_words+=("PREFECT_API_URL=$prefect"); fi
entry="cd $(printf '%q' "$remote_dir") && exec $(printf '%q ' "${env_words[@]}" "${cmd[@]}")"

echo "[submit] $address  job $job_id"
echo "[submit] entrypoint: $entry"
wait_flag=(--no-wait)
[ "${RCA_WAIT:-0}" = 1 ] && wait_flag=()
# `ray job submit` quotes each word after `--`: the whole command line goes to bash -c as one word.
"$ray_bin" job submit --address "$address" --submission-id "$job_id" ${wait_flag[@]+"${wait_flag[@]}"} -- bash -c "$entry"
if [ "${RCA_WAIT:-0}" != 1 ]; then
  cat <<EOF
[submit] follow it:  $ray_bin job logs  --address $address -f $job_id
[submit] status:     $ray_bin job status --address $address $job_id
[submit] stop it:    $ray_bin job stop   --address $address $job_id
(with RAY_AUTH_MODE=$RAY_AUTH_MODE${RAY_AUTH_TOKEN_PATH:+ RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH} in the environment, as now)
EOF
fi
