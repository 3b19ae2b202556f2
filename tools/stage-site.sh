#!/usr/bin/env bash
# Two device calls' worth of packages instead of three: every wheel the shared stage script
# wrote (.whl/a, .whl/b), unpacked here into one site folder and packed with xz, then split into
# .whl/s1 and .whl/s2, each small enough to travel beside the tree (64 MiB a call).
#
#   bash tools/stage-site.sh          then on the device: call 1 carry .whl/s1,
#                                     `mkdir -p /tmp/stage && cp .whl/s1/site.part0 /tmp/stage/`;
#                                     call 2 carry .whl/s2, `bash .whl/s2/unpack.sh && ...`
#
# Unpacking a wheel is what pip does for these (no .data scripts are needed: everything runs as
# `python -m`). PuLP's solver binaries for other systems are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
big="$(cat .whl/b/BIG_WHEEL 2>/dev/null || true)"
if [ -n "$big" ]; then
  cat .whl/a/big.part1 .whl/b/big.part2 > "$work/$big"
  echo "$(cat .whl/b/BIG_SHA256)  $work/$big" | sha256sum -c --quiet
fi
mkdir "$work/site"
for wheel in "$work"/*.whl .whl/a/*.whl .whl/b/*.whl; do
  [ -f "$wheel" ] && unzip -qo "$wheel" -d "$work/site"
done
rm -rf "$work"/site/*.data "$work"/site/pulp/solverdir/cbc/{osx,win} \
  "$work"/site/pulp/solverdir/cbc/linux/{arm64,i32}
tar -C "$work/site" -cf - . | xz -9 -T0 > "$work/site.tar.xz"
rm -rf .whl/s1 .whl/s2 && mkdir -p .whl/s1 .whl/s2
split -b 44000000 -d -a 1 "$work/site.tar.xz" "$work/site.part"
mv "$work/site.part0" .whl/s1/ && mv "$work/site.part1" .whl/s2/
cp .whl/*/libfmt-dev_*.deb .whl/s2/ 2>/dev/null || true
sha256sum "$work/site.tar.xz" | cut -d' ' -f1 > .whl/s2/SITE_SHA256
cat > .whl/s2/unpack.sh <<'SH'
#!/usr/bin/env bash
# On the GPU machine, after a call copied .whl/s1 to /tmp/stage: every wheel, unpacked, as /tmp/site.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cat /tmp/stage/site.part0 "$here/site.part1" > /tmp/site.tar.xz
echo "$(cat "$here/SITE_SHA256")  /tmp/site.tar.xz" | sha256sum -c --quiet
rm -rf /tmp/site && mkdir -p /tmp/site
python3 -c "import tarfile; tarfile.open('/tmp/site.tar.xz', 'r:xz').extractall('/tmp/site', filter='tar')"
rm -f /tmp/site.tar.xz /tmp/stage/site.part0
PYTHONPATH=/tmp/site python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
SH
chmod +x .whl/s2/unpack.sh
du -sh .whl/s1 .whl/s2
