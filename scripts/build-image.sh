#!/usr/bin/env bash
# Build the container image (Containerfile) with podman, with no registry needed.
# Usage: scripts/build-image.sh [podman build options...]     e.g. --build-arg EXTRAS=worker,minilm
# Environment:
#   IMAGE    the tag to build (default localhost/gpu-supervisor:<version in pyproject.toml>)
#   BASE     the base image; default a local Debian bookworm with python3, made once by mmdebstrap and
#            `podman import`ed as localhost/gpu-supervisor-base:bookworm (kept: later builds reuse it).
#            BASE=docker.io/library/python:3.11-slim-bookworm (the Containerfile's default) or a CUDA
#            runtime image (see Containerfile) where a registry is reachable.
#   WHEELS   a local directory of wheels pip looks in first (mounted read-only into the build): one
#            holding torch's CPU wheel keeps pip from downloading the multi-GB CUDA build. Default: the
#            find-links directory of this machine's pip config, if any; WHEELS= for PyPI only.
#   CONTAINERS_CONF   podman's settings; default deploy/container/containers.conf (runc, ulimits that work
#            in VMs that deny podman's defaults); CONTAINERS_CONF= for podman's own.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
IMAGE="${IMAGE:-localhost/gpu-supervisor:$version}"
LOCAL_BASE=localhost/gpu-supervisor-base:bookworm
BASE="${BASE:-$LOCAL_BASE}"
if [ -z "${CONTAINERS_CONF+set}" ]; then
    export CONTAINERS_CONF="$PWD/deploy/container/containers.conf"
elif [ -z "$CONTAINERS_CONF" ]; then
    unset CONTAINERS_CONF
fi
if [ -z "${WHEELS+set}" ]; then
    WHEELS=$(python3 -m pip config get global.find-links 2>/dev/null || true)
    [ -d "$WHEELS" ] || WHEELS=""
fi

if [ "$BASE" = "$LOCAL_BASE" ] && ! podman image exists "$LOCAL_BASE"; then
    echo "building $LOCAL_BASE with mmdebstrap (once)" >&2
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$tmp/base.tar"
    podman import --quiet "$tmp/base.tar" "$LOCAL_BASE" >/dev/null
fi

args=(--format docker --layers --tag "$IMAGE" --build-arg "BASE=$BASE" --file Containerfile)
# pip in the build trusts the host's CA bundle (a TLS-inspecting proxy's CA included)
[ -f /etc/ssl/certs/ca-certificates.crt ] &&
    args+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
if [ -n "$WHEELS" ]; then
    args+=(--volume "$(realpath "$WHEELS"):/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels)
fi
podman build "${args[@]}" "$@" .
echo "built $IMAGE (base $BASE${WHEELS:+, wheels from $WHEELS})" >&2
