#!/usr/bin/env bash
# A Prefect server in the background on this machine (the Ray head node of deploy/ray-cluster.yaml, or your own
# machine), bound to 127.0.0.1 only: reach its UI through a tunnel (`ray attach deploy/ray-cluster.yaml -p 4200`,
# `ssh -L 4200:127.0.0.1:4200 ...`). Prefect's server has no login of its own: never bind it to 0.0.0.0 without an
# authenticating proxy in front.
#
#   deploy/prefect-server.sh start    # start it unless it already answers; waits until /api/health answers
#   deploy/prefect-server.sh stop     # stop the server this script started (its pid file), only that one
#   deploy/prefect-server.sh status   # answers or not
#
# Variables: PREFECT_PORT (default 4200); PREFECT_HOME (default ~/.rca/prefect: its SQLite database, the
# server's log server.log and pid file server.pid); PREFECT_BIN (default: `prefect` on PATH, else .venv/bin/prefect).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
port="${PREFECT_PORT:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$HOME/.rca/prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_UI_API_URL="http://127.0.0.1:$port/api"
bin="${PREFECT_BIN:-$(command -v prefect || echo .venv/bin/prefect)}"
pidfile="$PREFECT_HOME/server.pid"
health() { python3 -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/api/health', timeout=2)" 2>/dev/null; }

case "${1:-start}" in
  start)
    mkdir -p "$PREFECT_HOME"
    if health; then echo "[prefect] already serving on http://127.0.0.1:$port"; exit 0; fi
    nohup "$bin" server start --host 127.0.0.1 --port "$port" >> "$PREFECT_HOME/server.log" 2>&1 < /dev/null &
    echo $! > "$pidfile"
    for _ in $(seq 120); do
      if health; then echo "[prefect] UI and API on http://127.0.0.1:$port (PREFECT_API_URL=http://127.0.0.1:$port/api; log $PREFECT_HOME/server.log)"; exit 0; fi
      kill -0 "$(cat "$pidfile")" 2>/dev/null || { echo "[prefect] the server exited; the end of $PREFECT_HOME/server.log:" >&2; tail -n 20 "$PREFECT_HOME/server.log" >&2; exit 1; }
      sleep 1
    done
    echo "[prefect] no answer on port $port after 120 s; log $PREFECT_HOME/server.log" >&2; exit 1 ;;
  stop)
    [ -f "$pidfile" ] || { echo "[prefect] no $pidfile: not started by this script"; exit 0; }
    pid="$(cat "$pidfile")"
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    rm -f "$pidfile"; echo "[prefect] stopped (pid $pid)" ;;
  status)
    if health; then echo "[prefect] serving on http://127.0.0.1:$port"; else echo "[prefect] not answering on port $port"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
