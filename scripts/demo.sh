#!/usr/bin/env bash
# One command on a fresh machine: install, build the tiny local model, run the daemon on 127.0.0.1:8080
# in front of the built-in transformers worker. Ctrl-C drains and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh worker
.venv/bin/python -m model_worker.tiny_model models/tiny-gpt2
exec .venv/bin/gpu-supervisor run --config "${GPU_SUPERVISOR_CONFIG:-configs/demo.yaml}"
