#!/usr/bin/env bash
# One GPU-machine call, any NVIDIA machine with MLX's CUDA build: check, benchmark, print a short
# table last. Full outputs go under $OUT (set by the device tool; ./.work/device-out otherwise)
# and travel back packed as one file.
#
#   tools/device.sh setup         once per machine: bytecode for the installed packages, the C++
#                                 primitive (fusedqk build-ext, or PRIMITIVE_FROM: a folder with one
#                                 built elsewhere, such as the cuda image's), fusedqk doctor,
#                                 llama.cpp for CUDA started in the background where
#                                 .work/llama-src.tar.xz is carried
#   tools/device.sh kernel        numerics probe, GPU tests (GPU_TESTS: a pytest -k filter), block
#                                 benchmark of the seed models, Nsight Compute device times
#   tools/device.sh identity      fusedqk identity of kernel and kernel_kv on the seed models, with
#                                 the cuda pipeline's identity settings
#   tools/device.sh pipeline      the pipeline, cuda backend, natively, resuming across calls
#                                 (RUN_NAME, FUSEDQK_GIT_COMMIT; PIPELINE_ARGS: more Snakemake flags)
#   tools/device.sh engine FILE M...  the pipeline through an overlay such as
#                                 config/cuda-llama-server.yaml or config/cuda-mlx-lm-server.yaml
#                                 on models M, the run written under $OUT (RUN_NAME)
#
# Machine paths, from variables (defaults in brackets): SITE_PACKAGES, where MLX's CUDA build is
# installed [/tmp/site] (../shared/device/README.md); NCU_DIR, Nsight Compute's folder [the newest
# /opt/nvidia/nsight-compute/*]; CUDA_BIN, nvcc's folder [/usr/local/cuda/bin]. NO_TORCH=1 runs
# every process in a venv that sees the machine's packages but PyTorch (tools/no_torch.py).
# Stages whose questions docs/perf-log.md has answered were retired; the log names the commit
# where each can still be read.
set -uo pipefail
stage="${1:?usage: tools/device.sh setup|kernel|identity|pipeline|engine FILE MODEL...}"
OUT="${OUT:-$PWD/.work/device-out}"
final="$OUT"
OUT="$final/raw"
mkdir -p "$OUT"
pack() { tar -C "$final" -czf "$final/$stage-outputs.tar.gz" raw && rm -rf "$OUT"; }
trap pack EXIT
SITE_PACKAGES="${SITE_PACKAGES:-/tmp/site}"
NCU_DIR="${NCU_DIR:-$(ls -d /opt/nvidia/nsight-compute/*/ 2>/dev/null | tail -1)}"
export PATH="$PATH:${CUDA_BIN:-/usr/local/cuda/bin}:$NCU_DIR"
export PYTHONPATH="$SITE_PACKAGES:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export FUSEDQK_LLAMA_CPP_SOURCE="$PWD/.work/llama-src.tar.xz"  # where PyPI cannot be reached
py=python3
if [ "${NO_TORCH:-0}" = 1 ]; then
  hidden="$(python3 tools/no_torch.py /tmp/no-torch)" && [ -n "$hidden" ] && py="$hidden"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
$py -m fusedqk env | tee "$OUT/env.txt"

# The C++ primitive, with fmt's headers from the .deb staged in .whl/ where there is one.
build_ext() {
  local fmt_deb fmt_args=()
  fmt_deb="$(ls .whl/*/libfmt-dev_*.deb 2>/dev/null | head -1)"
  [ -n "$fmt_deb" ] && dpkg -x "$fmt_deb" /tmp/fmt && fmt_args=(--fmt-include /tmp/fmt/usr/include)
  $py -m fusedqk build-ext --build-dir /tmp/ext-build "${fmt_args[@]}" 2>&1 | tee "$OUT/build-ext.txt"
}

# A pipeline run into $1 named $2 (more --config items after; Snakemake flags such as
# --configfile in PIPELINE_ARGS), stopped before the device tool's 10-minute limit
# (PIPELINE_TIMEOUT_S; Snakemake needs up to ~40 s to stop its jobs), and its report's head.
run_pipeline() {
  local results="$1" name="$2"
  shift 2
  local smk=($py -m snakemake ${PIPELINE_ARGS:-} --config 'backends=[cuda]' results_dir="$results"
             run_name="$name" "$@")
  pgrep -f "snakemake.*--cores" >/dev/null || "${smk[@]}" --unlock >/dev/null 2>&1
  local started=$SECONDS
  timeout -s INT "${PIPELINE_TIMEOUT_S:-540}" "${smk[@]}" --cores all --rerun-incomplete 2>&1 \
    | tee "$OUT/snakemake-$name.log" | grep -E "Finished|Error|steps" | tail -20
  echo "pipeline $name: $((SECONDS - started)) s" | tee -a "$OUT/pipeline-wall.txt"
  run_dir=$(ls -d "$results"/cuda-*/"$name" 2>/dev/null | head -1)
  [ -n "$run_dir" ] && [ -f "$run_dir/report.md" ] && sed -n '1,30p' "$run_dir/report.md"
}

case "$stage" in
setup)
  [ -f "$FUSEDQK_LLAMA_CPP_SOURCE" ] && (setsid nohup $py -m fusedqk build-llama-cpp --backend cuda \
    > "$OUT/llama-build.txt" 2>&1 < /dev/null &)
  started=$SECONDS
  $py -m compileall -q -j 0 "$SITE_PACKAGES" > "$OUT/compileall.txt" 2>&1
  echo "bytecode: $((SECONDS - started)) s" | tee "$OUT/setup.txt"
  if [ -n "${PRIMITIVE_FROM:-}" ]; then
    cp "$PRIMITIVE_FROM"/_fusedqk_cuda* fusedqk/kernels/cuda_ext/
  else
    build_ext | tail -2
  fi
  $py -m fusedqk doctor --require-gpu > "$OUT/doctor.txt" 2>&1; tail -8 "$OUT/doctor.txt"
  $py -m fusedqk env | grep "kernel call"
  ;;
identity)
  for m in qwen3-0.6b qwen3-8b qwen3-30b-a3b; do
    $py -m fusedqk identity -m "$m" --impls kernel,kernel_kv --no-cudnn-sdpa -p 64 -n 256 -k 3 \
      --concurrent-controls --out-dir "$OUT/identity-$m" 2>&1 | tail -4
  done
  ;;
kernel)
  $py tools/probe_cuda_numerics.py 2>&1 | tee "$OUT/probe.md"
  $py -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" \
    ${GPU_TESTS:+-k "$GPU_TESTS"} tests 2>&1 | tee "$OUT/gpu-tests.txt" | tail -30
  : > "$OUT/blockbench.md"
  for m in qwen3-0.6b qwen3-8b qwen3-30b-a3b; do
    $py -m fusedqk blockbench -m "$m" --out-dir "$OUT/bb-$m" >> "$OUT/blockbench.md" 2>&1
  done
  if command -v ncu >/dev/null; then  # device time of the kernels alone, clocks left as they are
    for m in qwen3-0.6b qwen3-8b qwen3-30b-a3b; do
      ncu --clock-control none --csv --metrics gpu__time_duration.sum -c 60 \
        -k "regex:fusedqk|qmv|rms_norm|rope" $py tools/kernel_time.py "$m" \
        > "$OUT/ncu-$m.csv" 2>"$OUT/ncu-$m.err"
    done
    $py tools/ncu_summary.py "$OUT"/ncu-*.csv > "$OUT/ncu.md"
  else
    echo "ncu not found: no kernel-only device times" > "$OUT/ncu.md"
  fi
  cat "$OUT/gpu.txt" "$OUT/blockbench.md" "$OUT/ncu.md"
  ;;
pipeline)
  # Into .work/results, which survives between calls on a warm machine; a machine that went
  # cold resumes from the partial run a previous call brought back (.work/resume.tar.gz), and
  # MLX's compiled kernels travel as .work/ptx-cache.tar.gz (keyed by GPU kind and MLX version).
  : "${RUN_NAME:?set RUN_NAME}" "${FUSEDQK_GIT_COMMIT:?set FUSEDQK_GIT_COMMIT}"
  if ! ls -d .work/results/cuda-*/"$RUN_NAME" >/dev/null 2>&1 && [ -f .work/resume.tar.gz ]; then
    mkdir -p .work/results && tar -C .work/results -xzf .work/resume.tar.gz
  fi
  [ -f .work/ptx-cache.tar.gz ] && mkdir -p ~/.cache/fusedqk && tar -C ~/.cache/fusedqk -xzf .work/ptx-cache.tar.gz
  run_pipeline .work/results "$RUN_NAME"
  [ -d ~/.cache/fusedqk/ptx ] && tar -C ~/.cache/fusedqk -czf "$final/ptx-cache.tar.gz" ptx
  [ -n "${run_dir:-}" ] && tar -C .work/results -czf "$final/run.tar.gz" \
    "$(basename "$(dirname "$run_dir")")/$RUN_NAME"
  ;;
engine)
  overlay="${2:?usage: tools/device.sh engine config/cuda-<engine>.yaml MODEL...}"
  shift 2
  models="[$(echo "$@" | tr ' ' ',')]"
  PIPELINE_ARGS="--configfile $overlay ${PIPELINE_ARGS:-}" \
    run_pipeline "$OUT/engine-results" "${RUN_NAME:-engine}" "backend_settings={cuda: {models: $models}}"
  ;;
*)
  echo "unknown stage $stage (setup, kernel, identity, pipeline, engine)" >&2
  exit 2
  ;;
esac
