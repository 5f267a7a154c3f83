#!/usr/bin/env bash
# Create .venv and install gpu-supervisor with what the given extras need (default: worker).
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh worker,minilm,test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-worker}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(echo "$extras" | tr ',' '-')-$(sha256sum pyproject.toml | cut -c1-12)"
if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch is pinned (==2.13.0) in pyproject: a looser spec would pull a multi-GB CUDA build
    .venv/bin/python -m pip install -q -e ".[$extras]"
    touch "$stamp"
fi
