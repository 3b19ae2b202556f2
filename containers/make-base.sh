#!/usr/bin/env bash
# Build a local base image from a distribution's packages, for sites that reach no public image
# registry:
#   containers/make-base.sh [engine] [tag] [suite]
#     defaults: podman, localhost/fusedqk-base:bookworm, bookworm
#     suite bookworm: Debian 12 (Python 3.11), the cpu image's base (config/config.yaml)
#     suite noble:    Ubuntu 24.04 (Python 3.12), the distribution of the cuda image's default
#                     NVIDIA base, so what its build stage compiles loads where that base's would
# Needs root and debootstrap.
set -euo pipefail
engine="${1:-podman}"
tag="${2:-localhost/fusedqk-base:bookworm}"
suite="${3:-bookworm}"
# Ubuntu's archive key, taken from noble's own ubuntu-keyring package (Debian 12 does not carry
# it); the package's digest is the one noble's signed Release lists, pinned here.
UBUNTU_KEYRING_DEB=pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb
UBUNTU_KEYRING_SHA256=36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8
UBUNTU_MIRROR="${UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}"
case "$suite" in
  bookworm|noble) ;;
  *) echo "make-base.sh: suite '$suite' is not one of: bookworm, noble" >&2; exit 2 ;;
esac
# One build at a time per machine: a second caller (a container test, while tests/run.sh builds
# the base in the background) waits here, then finds the image and stops.
exec 9> "${TMPDIR:-/tmp}/fusedqk-make-base.lock"
flock 9
if "$engine" image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
packages=python3,python3-venv,python3-pip,ca-certificates
if [ "$suite" = bookworm ]; then
  debootstrap --variant=minbase --include="$packages" bookworm "$dir/root" >/dev/null
else
  curl -fsS -o "$dir/keyring.deb" "$UBUNTU_MIRROR/$UBUNTU_KEYRING_DEB"
  echo "$UBUNTU_KEYRING_SHA256  $dir/keyring.deb" | sha256sum -c --quiet
  dpkg-deb -x "$dir/keyring.deb" "$dir/keyring"
  # debootstrap has no script named noble on Debian 12; Ubuntu's suites share jammy's.
  debootstrap --variant=minbase --components=main,universe --include="$packages" \
    --keyring="$dir/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg" \
    noble "$dir/root" "$UBUNTU_MIRROR" /usr/share/debootstrap/scripts/jammy >/dev/null
fi
tar -C "$dir/root" -c . | "$engine" import - "$tag" >/dev/null
echo "$tag"
