#!/usr/bin/env bash
# Create (or reuse) the project venv in .venv and install the pinned requirements + the project.
# `bash scripts/venv.sh test` also installs the test extra (pyproject.toml: pytest, the S3 server, playwright).
# Re-running is cheap: each install is skipped when requirements.txt and pyproject.toml are unchanged.
# One line per phase on stderr; pip's own output goes to .venv/setup.log (its tail is shown on failure).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RCA_VENV:-$here/.venv}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
say() { echo "[setup] $*" >&2; }
if [ ! -x "$venv/bin/python" ]; then
  t0=$SECONDS
  "$py" -m venv "$venv"
  say "venv: created $venv ($("$venv/bin/python" -V 2>&1), $((SECONDS - t0)) s)"
fi
extra="${1:-}"
stamp="$venv/.rca-installed"
extra_stamp="$venv/.rca-installed-${extra:-none}"
want="$(cat "$here/requirements.txt" "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)"
base_done=0
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  base_done=1
  if [ -z "$extra" ] || { [ -f "$extra_stamp" ] && [ "$(cat "$extra_stamp")" = "$want" ]; }; then
    exit 0
  fi
fi
log="$venv/setup.log"
[ "$base_done" = 1 ] || : > "$log"
# phase NAME COMMAND...: runs COMMAND with its output in the log; one line with the time it took, or the
# log's tail and exit 1 on failure. PYTHONWARNINGS: setuptools' "Editable installation" BuildBackendWarning
# only says that a folder named like the package shadows it, which is exactly how this repo is laid out.
phase() {
  local name="$1"; shift
  local t0=$SECONDS
  echo "=== $name: $*" >> "$log"
  if PYTHONWARNINGS="ignore:Editable installation" "$@" >> "$log" 2>&1; then
    say "$name ($((SECONDS - t0)) s)"
  else
    local rc=$?
    say "$name: FAILED (exit $rc); the end of $log:"
    grep -v "is ignored: it is neither" "$log" | tail -n 25 >&2
    exit 1
  fi
}
if [ "$base_done" = 0 ]; then
  say "installing into $venv (the first time takes a few minutes; pip output: $log)"
  phase "pip, setuptools, wheel: up to date" "$venv/bin/pip" install --quiet --upgrade pip setuptools wheel
  phase "requirements: installed (requirements.txt)" "$venv/bin/pip" install --quiet -r "$here/requirements.txt"
  phase "project: installed (editable: rca_core, tasks, flows, the rca command)" \
    "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$here"
  echo "$want" > "$stamp"
fi
if [ -n "$extra" ]; then
  # the extra's own pins (pyproject.toml); everything else is already installed from requirements.txt
  phase "extra [$extra]: installed (pyproject.toml)" "$venv/bin/pip" install --quiet --no-build-isolation -e "$here[$extra]"
  echo "$want" > "$extra_stamp"
fi
