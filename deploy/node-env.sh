# Environment of every node of deploy/ray-cluster.yaml. Sourced before `ray start` (so that Ray's processes, the
# job drivers and every worker inherit it) and from ~/.bashrc (so that `ray exec` / `ray attach` shells on a node
# have it too). Holds no secret itself: the Ray token and the optional AWS settings are files in ~/.rca/cluster/,
# copied from your machine by the cluster's file_mounts.
export PATH="$HOME/rca/.venv/bin:$PATH"
# Ray token auth stays ON: every node and every client (`ray job submit`) needs the same token.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$HOME/.rca/cluster/ray_auth_token"
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# ~/.rca/cluster/aws.env: KEY=VALUE lines, at least AWS_DEFAULT_REGION=<the bucket's region>. Credentials come from
# the instance profile (IamInstanceProfile in deploy/ray-cluster.yaml); only for another S3 (an S3-compatible
# server, another account) put AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL there too.
if [ -f "$HOME/.rca/cluster/aws.env" ]; then
  set -a
  . "$HOME/.rca/cluster/aws.env"
  set +a
fi
