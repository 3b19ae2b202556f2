#!/usr/bin/env bash
# Build a local base image from Debian's packages, for sites that reach no public image registry:
#   containers/make-base.sh [engine] [tag]      (defaults: podman, localhost/fusedqk-base:bookworm)
# Needs root and debootstrap. config/config.yaml names this tag as the cpu base image.
set -euo pipefail
engine="${1:-podman}"
tag="${2:-localhost/fusedqk-base:bookworm}"
# One build at a time per machine: a second caller (the container test, while tests/run.sh
# builds the base in the background) waits here, then finds the image and stops.
exec 9> "${TMPDIR:-/tmp}/fusedqk-make-base.lock"
flock 9
if "$engine" image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$dir" >/dev/null
tar -C "$dir" -c . | "$engine" import - "$tag" >/dev/null
echo "$tag"
