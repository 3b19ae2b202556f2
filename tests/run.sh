#!/usr/bin/env bash
# All set-up and every check, on a fresh Linux machine with Python 3.11 (the README's test
# command; .ci/run calls it): a virtual environment with the package and its pins, the
# container tools from Debian's packages where this runs as root, then ruff and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
# The system packages for the container and SLURM tests install in the background while pip
# installs the Python ones: neither waits for the other.
system_packages() {
  if ! command -v podman >/dev/null; then
    # For the container tests (podman builds the cpu image from a local Debian base, the cuda
    # image from a local Ubuntu one; curl fetches Ubuntu's archive key).
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap curl) \
      >/dev/null 2>&1 || echo "note: could not install podman/runc/debootstrap; the container test will skip"
  fi
  if ! command -v slurmctld >/dev/null; then
    # For the SLURM test (tests/test_slurm.py starts the daemons itself).
    bash tests/slurm/cluster.sh install >/dev/null 2>&1 \
      || echo "note: could not install SLURM's packages; the SLURM test will skip"
  fi
  # The container tests' bases (Debian 12 for the cpu image, Ubuntu 24.04 for the cuda image),
  # built while the other tests run (debootstrap mostly waits on the network); the tests wait for
  # these builds through make-base.sh's lock.
  if command -v podman >/dev/null && command -v debootstrap >/dev/null; then
    { containers/make-base.sh podman
      containers/make-base.sh podman localhost/fusedqk-base:noble noble; } > .venv/make-base.log 2>&1 &
  fi
}
[ -x .venv/bin/python ] || "$python" -m venv .venv
packages_pid=""
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  system_packages &
  packages_pid=$!
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[cpu,pipeline,dev]'
# llama.cpp for the CPU from its pinned source (tests/test_llama_cpp.py), built while the other
# tests run: minutes on two cores, once per checkout (kept in .venv/fusedqk-cache); the tests
# that need it wait for it through the build's lock.
build_path="$PWD/.venv/bin:$PATH"  # cmake and ninja come with the dev extras
if PATH="$build_path" command -v cmake >/dev/null && PATH="$build_path" command -v ninja >/dev/null; then
  PATH="$build_path" FUSEDQK_CACHE_DIR="$PWD/.venv/fusedqk-cache" nohup .venv/bin/python -m fusedqk \
    build-llama-cpp --backend cpu --jobs 2 > .venv/llama-cpp-build.log 2>&1 &
fi
[ -z "$packages_pid" ] || wait "$packages_pid"
.venv/bin/ruff check .
# Two workers (pytest-xdist) on the 2-core machine: most tests wait on subprocesses and Python
# start-up, not on both cores. PYTEST_WORKERS=0 runs them in one process.
workers="${PYTEST_WORKERS:-2}"
set +e
if [ "$workers" = 0 ]; then
  .venv/bin/python -m pytest -ra "$@"
else
  .venv/bin/python -m pytest -ra -n "$workers" --dist worksteal "$@"
fi
status=$?
set -e
# pytest's 5 means no test ran: that is a failure here, never a pass.
[ "$status" -eq 5 ] && echo "no tests ran" >&2
exit "$status"
