# Environment for local runs and tests (sourced by scripts/main.sh and scripts/test.sh).
# No network here: keep Prefect and Ray from phoning home, keep Ray on loopback without auth tokens.
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_CLI_PROMPT=false
export DO_NOT_TRACK=1
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-5}
export PYTHONUNBUFFERED=1
