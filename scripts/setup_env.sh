#!/usr/bin/env bash
# Creates ./.venv (once) with the pinned requirements and this package, then
# activates it. Sourced by run_demo.sh and run_tests.sh: nothing to do by hand.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
STAMP="$ROOT/.venv/.installed-$(sha1sum "$ROOT/requirements.txt" "$ROOT/setup.py" | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "[setup] creating $ROOT/.venv with $($PY --version) and the pinned requirements (first run only)..."
  "$PY" -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install -q --upgrade pip
  "$ROOT/.venv/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
  "$ROOT/.venv/bin/python" -m pip install -q --no-deps -e "$ROOT"
  rm -f "$ROOT"/.venv/.installed-*
  touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cd "$ROOT"
