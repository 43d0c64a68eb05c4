#!/usr/bin/env bash
# A Prefect server on this machine (the Ray head node of deploy/ray-cluster.yaml, or your own machine), bound to
# 127.0.0.1 only: reach its UI through a tunnel (`ray attach deploy/ray-cluster.yaml -p 4200`,
# `ssh -L 4200:127.0.0.1:4200 ...`). Prefect's server has no login of its own: never bind it to 0.0.0.0 without an
# authenticating proxy in front. The Prefect container of deploy/kuberay-raycluster.yaml runs `run` (foreground).
#
#   deploy/prefect-server.sh start    # start it unless it already answers; waits until /api/health answers
#   deploy/prefect-server.sh stop     # stop the server this script started (its pid file), only that one
#   deploy/prefect-server.sh status   # answers or not
#   deploy/prefect-server.sh run      # the server in the foreground (a container's command), same database choice
#   deploy/prefect-server.sh db       # say which database the server would use, and stop there
#
# The database, said at every start (password masked):
#   1. PREFECT_API_DATABASE_CONNECTION_URL (or PREFECT_SERVER_DATABASE_CONNECTION_URL) from the environment;
#   2. else the first line of the file PREFECT_DB_URL_FILE (when set, it must exist), by default $PREFECT_HOME/db_url
#      if present (deploy/prefect-db.sh writes it: a PostgreSQL on this machine, or a managed database's URL);
#   3. else SQLite, $PREFECT_HOME/prefect.db: fine for one user; a shared server wants PostgreSQL (deploy/README.md).
# PostgreSQL URLs: postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB (asyncpg is Prefect's driver, pinned in
# requirements.txt); a postgres:// or postgresql:// URL gets +asyncpg added. Before starting on PostgreSQL the script
# waits, at most PREFECT_DB_WAIT_S seconds (default 120), until HOST:PORT accepts connections.
#
# Variables: PREFECT_PORT (default 4200); PREFECT_HOME (default ~/.rca/prefect: the server's log server.log, its pid
# file server.pid, db_url, and the SQLite database when that is the one); PREFECT_BIN (default: `prefect` on PATH,
# else .venv/bin/prefect); PREFECT_SERVER_HOST (`run` only, default 127.0.0.1; any other address only with
# PREFECT_SERVER_API_AUTH_STRING set, Prefect's basic auth).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
port="${PREFECT_PORT:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$HOME/.rca/prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-http://127.0.0.1:$port/api}"
bin="${PREFECT_BIN:-$(command -v prefect || echo .venv/bin/prefect)}"
pidfile="$PREFECT_HOME/server.pid"
health() { python3 -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/api/health', timeout=2)" 2>/dev/null; }
die() { echo "[prefect] $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------- the database
db_url="" db_from=""
if [ -n "${PREFECT_SERVER_DATABASE_CONNECTION_URL:-}" ]; then   # Prefect prefers this name when both are set
  db_url="$PREFECT_SERVER_DATABASE_CONNECTION_URL" db_from="PREFECT_SERVER_DATABASE_CONNECTION_URL"
elif [ -n "${PREFECT_API_DATABASE_CONNECTION_URL:-}" ]; then
  db_url="$PREFECT_API_DATABASE_CONNECTION_URL" db_from="PREFECT_API_DATABASE_CONNECTION_URL"
else
  file="${PREFECT_DB_URL_FILE:-}"
  if [ -n "$file" ] && [ ! -s "$file" ]; then die "PREFECT_DB_URL_FILE=$file: no such file, or empty"; fi
  [ -n "$file" ] || { [ -s "$PREFECT_HOME/db_url" ] && file="$PREFECT_HOME/db_url"; } || true
  if [ -n "$file" ]; then
    db_url="$(grep -v '^[[:space:]]*\(#\|$\)' "$file" | head -n 1 | tr -d '[:space:]')" db_from="$file"
    [ -n "$db_url" ] || die "$file holds no URL"
  fi
fi
# kind, the URL to use, the URL with its password masked, host, port (separated by \x1f; the URL goes through the
# environment, not the command line: no password in a process list)
IFS=$'\x1f' read -r db_kind db_url db_shown db_host db_port < <(RCA_DB_URL="$db_url" python3 -c '
import os, sys, urllib.parse as u
url = os.environ["RCA_DB_URL"]
if not url:
    print("sqlite", "", "", "", "", sep="\x1f"); sys.exit()
p = u.urlsplit(url)
scheme = {"postgres": "postgresql+asyncpg", "postgresql": "postgresql+asyncpg"}.get(p.scheme, p.scheme)
kind = {"postgresql+asyncpg": "postgresql", "sqlite+aiosqlite": "sqlite"}.get(scheme, "unsupported:" + p.scheme)
full = scheme + url[len(p.scheme):]  # only the scheme changes (sqlite:////abs/path keeps its slashes)
shown = full if p.password is None else full.replace(":" + p.password + "@", ":***@", 1)
try:
    port = p.port or 5432
except ValueError:
    port = 5432
print(kind, full, shown, p.hostname or "", port, sep="\x1f")
')
case "$db_kind" in
  sqlite)
    if [ -n "$db_url" ]; then db_text="SQLite $db_shown (from $db_from)"
    else db_text="SQLite $PREFECT_HOME/prefect.db (no PREFECT_API_DATABASE_CONNECTION_URL, no PREFECT_DB_URL_FILE, no $PREFECT_HOME/db_url): fine for one user; a shared server wants PostgreSQL"; fi ;;
  postgresql) db_text="PostgreSQL $db_shown (from $db_from)" ;;
  *) die "unsupported database URL $db_shown (from $db_from): Prefect takes postgresql+asyncpg:// or sqlite+aiosqlite://" ;;
esac
if [ -n "$db_url" ]; then
  export PREFECT_API_DATABASE_CONNECTION_URL="$db_url" PREFECT_SERVER_DATABASE_CONNECTION_URL="$db_url"
fi

wait_db() {  # PostgreSQL: bounded wait until host:port accepts TCP connections
  [ "$db_kind" = postgresql ] || return 0
  python3 - "$db_host" "$db_port" "${PREFECT_DB_WAIT_S:-120}" <<'PY' || die "the database at $db_host:$db_port did not accept connections within ${PREFECT_DB_WAIT_S:-120} s"
import socket, sys, time
host, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline, said = time.time() + wait, False
while True:
    try:
        socket.create_connection((host, port), timeout=2).close()
        sys.exit(0)
    except OSError as e:
        if time.time() >= deadline:
            sys.exit(1)
        if not said:
            print(f"[prefect] waiting for the database at {host}:{port} ({e})", flush=True)
            said = True
        time.sleep(1)
PY
}

case "${1:-start}" in
  db)
    echo "[prefect] database: $db_text" ;;
  start)
    mkdir -p "$PREFECT_HOME"
    if health; then echo "[prefect] already serving on http://127.0.0.1:$port (it keeps the database it started with)"; exit 0; fi
    echo "[prefect] database: $db_text"
    wait_db
    nohup "$bin" server start --host 127.0.0.1 --port "$port" >> "$PREFECT_HOME/server.log" 2>&1 < /dev/null &
    echo $! > "$pidfile"
    for _ in $(seq 120); do
      if health; then echo "[prefect] UI and API on http://127.0.0.1:$port (PREFECT_API_URL=http://127.0.0.1:$port/api; log $PREFECT_HOME/server.log)"; exit 0; fi
      kill -0 "$(cat "$pidfile")" 2>/dev/null || { echo "[prefect] the server exited; the end of $PREFECT_HOME/server.log:" >&2; tail -n 20 "$PREFECT_HOME/server.log" >&2; exit 1; }
      sleep 1
    done
    echo "[prefect] no answer on port $port after 120 s; log $PREFECT_HOME/server.log" >&2; exit 1 ;;
  run)
    host="${PREFECT_SERVER_HOST:-127.0.0.1}"
    case "$host" in
      127.0.0.1|localhost|::1) ;;
      *) [ -n "${PREFECT_SERVER_API_AUTH_STRING:-}" ] || die "refusing to listen on $host without PREFECT_SERVER_API_AUTH_STRING (Prefect's basic auth)" ;;
    esac
    mkdir -p "$PREFECT_HOME"
    echo "[prefect] database: $db_text"
    wait_db
    exec "$bin" server start --host "$host" --port "$port" ;;
  stop)
    [ -f "$pidfile" ] || { echo "[prefect] no $pidfile: not started by this script"; exit 0; }
    pid="$(cat "$pidfile")"
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    rm -f "$pidfile"; echo "[prefect] stopped (pid $pid)" ;;
  status)
    if health; then echo "[prefect] serving on http://127.0.0.1:$port"; else echo "[prefect] not answering on port $port"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status|run|db" >&2; exit 2 ;;
esac
