#!/usr/bin/env bash
# Copy the C++ primitive and its build record out of a cuda image, for a GPU host that runs
# natively with the same Python (3.12 for the default base) and MLX:
#   containers/copy-primitive.sh [engine] IMAGE DEST
# then put both files in that host's fusedqk/kernels/cuda_ext/ (`fusedqk doctor` checks them).
# RUN_ARGS: extra `run` arguments, as container.run_args in the configuration.
set -euo pipefail
read -r -a run_args <<< "${RUN_ARGS:-}"
if [ $# -eq 3 ]; then engine="$1"; shift; else engine=podman; fi
image="${1:?usage: copy-primitive.sh [engine] IMAGE DEST}"
dest="${2:?usage: copy-primitive.sh [engine] IMAGE DEST}"
mkdir -p "$dest"
# The files' paths inside the image, in one run (the package folder depends on its Python).
paths="$("$engine" run --rm "${run_args[@]}" --network none "$image" python3 -c '
import importlib.util, pathlib
folder = pathlib.Path(importlib.util.find_spec("fusedqk.kernels.cuda_ext").origin).parent
print("\n".join(str(p) for p in sorted(folder.glob("_fusedqk_cuda*"))))')"
container="$("$engine" create "$image")"
trap '"$engine" rm -f "$container" >/dev/null' EXIT
for path in $paths; do
  "$engine" cp "$container:$path" "$dest/$(basename "$path")"
  echo "$dest/$(basename "$path")"
done
