#!/usr/bin/env bash
# The head container of deploy/kuberay-raycluster.yaml: `ray start` exactly as KubeRay generated it
# ($KUBERAY_GEN_RAY_START_CMD, with --block) and, once the node is up, `rca serve` beside it in the same container,
# so that every flow run started from the Prefect UI is a Ray driver ON the head node (ray.address=auto, no Ray
# Client). `rca serve` is restarted if it exits; the container ends (and Kubernetes restarts it) when Ray ends.
# Variables (set in the manifest):
#   RCA_SERVE_CONFIG   config file of the served deployments (default configs/demo.yaml); empty: no `rca serve`
#   RCA_SERVE_NAME     deployment name (default demo)
#   RCA_SERVE_ARGS     more `rca serve` options, e.g. "--set store=s3://BUCKET/runs/demo --set data.root=s3://..."
#   PREFECT_API_URL    the Prefect server (http://rca-prefect:4200/api in the manifest)
#   RCA_SERVE_RAY_ADDRESS  ray.address of the served flow runs (default auto: this node's Ray)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."     # the repository (/app in the image)
: "${KUBERAY_GEN_RAY_START_CMD:?not started by KubeRay (no KUBERAY_GEN_RAY_START_CMD)}"
ulimit -n "${RAY_START_ULIMIT_OPEN_FILES:-65536}"
bash -c "$KUBERAY_GEN_RAY_START_CMD" &
ray_pid=$!
serve_pid=
# As PID 1 of the container this shell ignores SIGTERM unless it traps it: pass it on (pod deletion, restarts).
trap 'kill -TERM $serve_pid "$ray_pid" 2>/dev/null' TERM INT
until ray status >/dev/null 2>&1; do
  kill -0 "$ray_pid" 2>/dev/null || { wait "$ray_pid"; exit $?; }
  sleep 2
done
echo "[kuberay-head] Ray head is up"
config="${RCA_SERVE_CONFIG-configs/demo.yaml}"
if [ -n "$config" ]; then
  (
    child=
    trap 'kill -TERM $child 2>/dev/null; exit 0' TERM
    while kill -0 "$ray_pid" 2>/dev/null; do
      # word splitting of RCA_SERVE_ARGS is wanted: it holds several options
      # shellcheck disable=SC2086
      RAY_ADDRESS="${RCA_SERVE_RAY_ADDRESS:-auto}" bash deploy/serve.sh "$config" "${RCA_SERVE_NAME:-demo}" ${RCA_SERVE_ARGS:-} &
      child=$!
      wait "$child"
      echo "[kuberay-head] rca serve exited ($?); restarting in 15 s"
      sleep 15
    done
  ) &
  serve_pid=$!
fi
wait "$ray_pid"
status=$?
if kill -0 "$ray_pid" 2>/dev/null; then wait "$ray_pid"; status=$?; fi   # a trapped signal ended the first wait
[ -n "$serve_pid" ] && kill -TERM "$serve_pid" 2>/dev/null
exit $status
