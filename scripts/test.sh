#!/usr/bin/env bash
# One command on a fresh machine: install everything the tests use, then run the whole suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k proxy).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v promtool >/dev/null || need+=(prometheus)          # promtool check metrics, a real Prometheus
command -v prometheus >/dev/null || need+=(prometheus)
command -v systemd-analyze >/dev/null || need+=(systemd)      # systemd-analyze verify
command -v redis-server >/dev/null || need+=(redis-server)    # the job store across hosts
command -v chromium >/dev/null || need+=(chromium)            # the /ui page, rendered for real
command -v setpriv >/dev/null || need+=(util-linux)           # the worker dies with its daemon
# the container image, built and run for real (tests/test_container.py): rootful podman on runc (crun fails
# in some VMs), mmdebstrap for a local Debian base image (no registry needed)
command -v podman >/dev/null || need+=(podman runc)
command -v runc >/dev/null || need+=(runc)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi
scripts/setup.sh worker,minilm,test
.venv/bin/ruff check supervisor model_worker tests bench
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
