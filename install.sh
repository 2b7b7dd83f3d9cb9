#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs convfirst-jax (editable) with its test
# tools.  Usage: ./install.sh [--cuda]   (--cuda adds jax's CUDA 13 build for NVIDIA GPUs)
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  for cand in python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare | grep -E '^3\.(1[2-9])(\.|$)' | sort -V); do
      p=$(PYENV_VERSION="$v" pyenv which python3 2>/dev/null) && { echo "$p"; return 0; }
    done
  fi
  return 1
}

PY=$(find_python) || {
  echo "error: convfirst-jax needs Python >= 3.12 (jax 0.11); none found on PATH or in pyenv." >&2
  echo "       Install one (e.g. 'pyenv install 3.12') and run ./install.sh again." >&2
  exit 1
}
echo "using $PY ($("$PY" --version))"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras="dev"
[ "${1:-}" = "--cuda" ] && extras="dev,cuda"
.venv/bin/python -m pip install -q -e ".[$extras]"
echo "installed: .venv/bin/python -m pytest -q -n 2   runs the tests"
