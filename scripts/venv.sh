#!/usr/bin/env bash
# Create (or reuse) the project venv in .venv and install the pinned requirements + the project.
# Re-running is cheap: the install is skipped when requirements.txt and pyproject.toml are unchanged.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RCA_VENV:-$here/.venv}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating venv at $venv" >&2
  "$py" -m venv "$venv"
fi
stamp="$venv/.rca-installed"
want="$(cat "$here/requirements.txt" "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing requirements (first time takes a few minutes)" >&2
  # (pip's "Location ... is ignored" lines come from this machine's extra local indexes: noise)
  set +e
  { "$venv/bin/pip" install --quiet --upgrade pip setuptools wheel &&
    "$venv/bin/pip" install --quiet -r "$here/requirements.txt" &&
    "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$here"; } 2>&1 | grep -v "is ignored: it is neither" >&2
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" -eq 0 ] || { echo "[setup] pip install failed (exit $rc)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
