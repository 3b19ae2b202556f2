#!/usr/bin/env bash
# Fewer device calls' worth of packages: every wheel the shared stage script wrote (.whl/a,
# .whl/b), unpacked here into one site folder and packed with xz, then split into SITE_PARTS
# parts (default 2) in .whl/s1 ... .whl/sN, each small enough to travel beside the tree (64 MiB
# a call, the tree included: three parts once the tree is over about 20 MB).
#
#   bash tools/stage-site.sh          then on the device: call k < N carry .whl/sk,
#                                     `mkdir -p /tmp/stage && cp .whl/sk/site.part* /tmp/stage/`;
#                                     call N carry .whl/sN, `bash .whl/sN/unpack.sh && ...`
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
parts="${SITE_PARTS:-2}"
last=".whl/s$parts"
rm -rf .whl/s[0-9]*
size=$(stat -c %s "$work/site.tar.xz")
split -b $(( (size + parts - 1) / parts )) -d -a 1 "$work/site.tar.xz" "$work/site.part"
for i in $(seq 0 $((parts - 1))); do
  mkdir -p ".whl/s$((i + 1))" && mv "$work/site.part$i" ".whl/s$((i + 1))/"
done
cp .whl/*/libfmt-dev_*.deb "$last/" 2>/dev/null || true
sha256sum "$work/site.tar.xz" | cut -d' ' -f1 > "$last/SITE_SHA256"
cat > "$last/unpack.sh" <<'SH'
#!/usr/bin/env bash
# On the GPU machine, after earlier calls copied the other parts to /tmp/stage: every wheel,
# unpacked, as /tmp/site.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cat /tmp/stage/site.part* "$here"/site.part* > /tmp/site.tar.xz
echo "$(cat "$here/SITE_SHA256")  /tmp/site.tar.xz" | sha256sum -c --quiet
rm -rf /tmp/site && mkdir -p /tmp/site
python3 -c "import tarfile; tarfile.open('/tmp/site.tar.xz', 'r:xz').extractall('/tmp/site', filter='tar')"
rm -f /tmp/site.tar.xz /tmp/stage/site.part*
PYTHONPATH=/tmp/site python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
SH
chmod +x "$last/unpack.sh"
du -sh .whl/s[0-9]*
