#!/usr/bin/env bash
# The database of the cluster's Prefect server, on the Ray head of deploy/ray-cluster.yaml (or any machine): a
# managed PostgreSQL given by its URL, or a PostgreSQL of its own on this machine, bound to 127.0.0.1. Either way it
# writes the database URL to $PREFECT_HOME/db_url (mode 600), where deploy/prefect-server.sh reads it.
#
#   deploy/prefect-db.sh install   # PostgreSQL's server binaries (apt-get, sudo) unless present or a managed URL
#                                  # is given; the head's set-up
#   deploy/prefect-db.sh start     # idempotent: a managed URL if given, else initdb (once), start (unless running),
#                                  # the role, the database and the pg_trgm extension (once), the URL file
#   deploy/prefect-db.sh stop      # stop the PostgreSQL of PREFECT_PG_DATA (the one this script starts), only that one
#   deploy/prefect-db.sh status    # which database, and whether the local PostgreSQL runs
#
# A managed database (RDS, Cloud SQL, Azure, ...): put its URL, postgresql+asyncpg://USER:PASSWORD@HOST:5432/DB
# (the password URL-encoded), alone in the file PREFECT_DB_MANAGED_URL_FILE (default ~/.rca/cluster/prefect_db_url,
# which `ray up` copies from your machine). `start` then copies it to $PREFECT_HOME/db_url and starts no PostgreSQL.
#
# The local PostgreSQL: one data directory (PREFECT_PG_DATA) owned by the user that runs this script, listening on
# 127.0.0.1:PREFECT_PG_PORT only, its Unix socket in a folder of its own (no /var/run/postgresql needed), peer
# authentication on that socket (the administrator is the OS user) and scram-sha-256 passwords over TCP. Prefect
# connects as the role PREFECT_PG_USER with the password in PREFECT_PG_PASSWORD_FILE (generated once, mode 600,
# unless you put one there first); it owns the database PREFECT_PG_DB. PostgreSQL refuses to run as root: run this
# script as an ordinary user (the head's `ubuntu`; as root, e.g. `runuser -u postgres -- deploy/prefect-db.sh start`
# with folders that user may write). Prefect 3 needs PostgreSQL 14.9 or later.
#
# Variables (defaults):
#   PREFECT_HOME (~/.rca/prefect)             where db_url goes
#   PREFECT_DB_MANAGED_URL_FILE (~/.rca/cluster/prefect_db_url)   a managed database's URL, if that file exists
#   PREFECT_PG_DATA (~/.rca/postgres/data)    the data directory; its log is ../postgres.log, its socket ../run/
#   PREFECT_PG_PORT (5432), PREFECT_PG_USER (prefect), PREFECT_PG_DB (prefect)
#   PREFECT_PG_PASSWORD_FILE (~/.rca/postgres/prefect_password)
#   PG_BIN: the folder of initdb, pg_ctl, psql (default: the newest /usr/lib/postgresql/*/bin, else those on PATH)
set -euo pipefail
export PREFECT_HOME="${PREFECT_HOME:-$HOME/.rca/prefect}"
managed="${PREFECT_DB_MANAGED_URL_FILE:-$HOME/.rca/cluster/prefect_db_url}"
data="${PREFECT_PG_DATA:-$HOME/.rca/postgres/data}"
port="${PREFECT_PG_PORT:-5432}"
user="${PREFECT_PG_USER:-prefect}"
db="${PREFECT_PG_DB:-prefect}"
pwfile="${PREFECT_PG_PASSWORD_FILE:-$HOME/.rca/postgres/prefect_password}"
urlfile="$PREFECT_HOME/db_url"
base="$(dirname "$data")"
sock="$base/run"
log="$base/postgres.log"
say() { echo "[prefect-db] $*"; }
die() { echo "[prefect-db] $*" >&2; exit 1; }

pg_bin() {  # the folder of the server binaries, or nothing
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  if [ -n "$d" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return; fi
  if command -v pg_ctl >/dev/null 2>&1; then dirname "$(command -v pg_ctl)"; fi
}

mask() {  # a database URL with its password replaced by *** (passed in the environment: not in a process list)
  RCA_DB_URL="$1" python3 -c 'import os, urllib.parse as u
url = os.environ["RCA_DB_URL"]
p = u.urlsplit(url)
print(url if p.password is None else url.replace(":" + p.password + "@", ":***@", 1))'
}

write_url() {  # write_url URL: $PREFECT_HOME/db_url, readable by this user only
  mkdir -p "$PREFECT_HOME"
  (umask 077; printf '%s\n' "$1" > "$urlfile.tmp")
  mv -f "$urlfile.tmp" "$urlfile"
}

managed_url() {  # the managed database's URL, or nothing
  [ -s "$managed" ] || return 0
  grep -v '^[[:space:]]*\(#\|$\)' "$managed" | head -n 1 | tr -d '[:space:]'
}

running() { [ -n "$bin" ] && [ -f "$data/PG_VERSION" ] && "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1; }

bin="$(pg_bin)"
case "${1:-start}" in
  install)
    if [ -n "$(managed_url)" ]; then say "managed database in $managed: no PostgreSQL to install"; exit 0; fi
    if [ -n "$bin" ]; then say "PostgreSQL present: $("$bin/postgres" --version)"; exit 0; fi
    command -v apt-get >/dev/null || die "no PostgreSQL binaries and no apt-get: install PostgreSQL 14.9+ and set PG_BIN"
    sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq postgresql
    # Debian/Ubuntu start a cluster of their own on port 5432 at install: this script runs its own data directory
    # instead, so that one is stopped and kept from starting at boot (its files stay).
    if command -v systemctl >/dev/null && systemctl is-enabled postgresql >/dev/null 2>&1; then
      sudo systemctl disable --now postgresql
    fi
    bin="$(pg_bin)"; [ -n "$bin" ] || die "apt-get installed postgresql but no pg_ctl was found; set PG_BIN"
    say "installed: $("$bin/postgres" --version)" ;;

  start)
    url="$(managed_url)"
    if [ -n "$url" ]; then
      write_url "$url"
      say "managed database $(mask "$url") (from $managed): no local PostgreSQL; URL in $urlfile"
      exit 0
    fi
    [ "$(id -u)" != 0 ] || die "PostgreSQL refuses to run as root: run this script as an ordinary user"
    [ -n "$bin" ] || die "no PostgreSQL binaries (pg_ctl): run \`$0 install\` or set PG_BIN"
    mkdir -p "$base" "$sock" "$(dirname "$pwfile")"
    chmod 700 "$base" "$sock"
    if [ ! -s "$pwfile" ]; then
      (umask 077; python3 -c 'import secrets; print(secrets.token_hex(24))' > "$pwfile")
      say "generated the password of role $user in $pwfile"
    fi
    chmod 600 "$pwfile"
    pw="$(head -n 1 "$pwfile" | tr -d '\r\n')"
    [ -n "$pw" ] || die "$pwfile is empty"
    if [ ! -f "$data/PG_VERSION" ]; then
      # peer on the socket (the OS user is the administrator), scram-sha-256 passwords over TCP
      "$bin/initdb" -D "$data" --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 --no-locale \
        >> "$log" 2>&1 || { tail -n 20 "$log" >&2; die "initdb failed (log $log)"; }
      say "initialised $data ($("$bin/postgres" --version))"
    fi
    if running; then
      say "PostgreSQL already running ($data)"
    else
      # listen on 127.0.0.1 only; the socket in a folder of its own (set at every start, so PREFECT_PG_PORT may change)
      "$bin/pg_ctl" start -D "$data" -l "$log" -w -t 120 \
        -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories='$sock'" >/dev/null \
        || { tail -n 20 "$log" >&2; die "PostgreSQL did not start within 120 s (log $log)"; }
      say "PostgreSQL started on 127.0.0.1:$port ($data, log $log)"
    fi
    # the role (its password re-set from the file at every start), the database, pg_trgm (Prefect's migrations
    # need it); SQL on stdin, so the password never shows in a process list
    export PGOPTIONS="-c client_min_messages=warning"  # no NOTICE for what already exists
    psql=("$bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$sock" -p "$port" -v "u=$user" -v "d=$db")
    pwsql="${pw//\'/\'\'}"  # a SQL string literal's quotes doubled
    "${psql[@]}" -d postgres >/dev/null <<SQL || die "creating role $user / database $db failed"
SELECT format('CREATE ROLE %I LOGIN', :'u') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'u')\gexec
ALTER ROLE :"u" WITH LOGIN PASSWORD '$pwsql';
SELECT format('CREATE DATABASE %I OWNER %I', :'d', :'u') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'d')\gexec
SQL
    "${psql[@]}" -d "$db" -c 'CREATE EXTENSION IF NOT EXISTS pg_trgm' >/dev/null
    enc="$(RCA_PW="$pw" python3 -c 'import os, urllib.parse as u; print(u.quote(os.environ["RCA_PW"], safe=""))')"
    write_url "postgresql+asyncpg://$user:$enc@127.0.0.1:$port/$db"
    say "database $db, role $user on 127.0.0.1:$port; URL in $urlfile" ;;

  stop)
    if running; then
      "$bin/pg_ctl" stop -D "$data" -m fast -w -t 60 >/dev/null
      say "PostgreSQL stopped ($data)"
    else
      say "no PostgreSQL running on $data"
    fi ;;

  status)
    if [ -s "$urlfile" ]; then say "URL file $urlfile: $(mask "$(head -n 1 "$urlfile")")"; else say "no $urlfile"; fi
    if running; then say "local PostgreSQL running ($data)"; else say "local PostgreSQL not running ($data)"; fi ;;

  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
