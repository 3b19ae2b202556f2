#!/usr/bin/env bash
# Everything one GPU-machine call does, in one script: check, benchmark, print a short table last.
# Full outputs go under $OUT (set by the device tool; defaults to ./.work/device-out here).
#
#   tools/device.sh setup         once per machine, after the wheels are installed: bytecode for
#                                 the installed packages, the C++ primitive, and what importing
#                                 mlx-lm costs with and without this machine's PyTorch
#                                 (SETUP_IMPORTS=0 skips that timing)
#   tools/device.sh kernel        numerics probe, GPU tests, blockbench of the three seed models,
#                                 Nsight Compute device time of one layer per path
#   tools/device.sh profile       Nsight Compute sections of one fused-kernel launch
#   tools/device.sh pipeline      the Snakemake pipeline, cuda backend, natively; archive packed
#                                 (BUILD_EXT=1: build the C++ primitive first)
#   tools/device.sh primitive     build the C++ primitive (fusedqk build-ext), GPU tests through
#                                 both kernel calls, blockbench with the primitive's rows
#   tools/device.sh launchfloor [N]  blockbench's graph, kernel and launch-floor rows, N (3)
#                                 times per model: the launch floor across host states
#   tools/device.sh breakdown     fusedqk's decode loop and mlx-lm's single-sequence and batched
#                                 loops in-process, per arm (tools/server_breakdown.py): what the
#                                 server adds (BREAKDOWN_MODELS, BREAKDOWN_REPEATS)
#   tools/device.sh serverlen     the mlx-lm server engine's bench in several round shapes, each
#                                 within one measuring budget, and what each would reach in 240 s
#                                 (SERVERLEN_MODEL, SERVERLEN_SHAPES, SERVERLEN_PASSES,
#                                 SERVERLEN_BUDGET_S, SERVERLEN_TIMEOUT_S)
#   tools/device.sh variety       distinct ids in greedy decodes of the seed models' synthetic
#                                 weights, per quantization (tools/variety.py)
#   tools/device.sh after         the GPU tests through both kernel calls (the primitive built
#                                 first; GPU_TESTS=0 skips them), then qwen3-30b-a3b's start to
#                                 first token, twice
#   tools/device.sh warmup        where a fresh process's start to its first token goes:
#                                 cold and warm caches, cProfile, cuDNN attention off
#                                 (WARMUP_MODEL, WARMUP_RUNS, WARMUP_TIMEOUT_S)
#   tools/device.sh firstuse      what a fresh process pays before its first token beyond weights:
#                                 a first and a second prefill in one process, with cuDNN's
#                                 attention on and off, and a 1-token prompt (FIRSTUSE_MODEL);
#                                 the block benchmark's first call per path (FIRSTUSE_BLOCK_MODEL)
#   tools/device.sh batch         the fused kernel at every batch, plain and cache-writing calls
#                                 (BATCH_TESTS), after setup
#   tools/device.sh llama         llama.cpp built for CUDA from .work/llama-src.tar.xz, then the
#                                 pipeline through LLAMA_ENGINES on LLAMA_MODELS
#   tools/device.sh kernelkv      kernel_kv's GPU tests (KV_TESTS), its block, its device time
#                                 per launch (ncu), the launch into differently made cache
#                                 buffers (tools/kv_probe.py) and its decode beside kernel's
#                                 (KV_MODEL, KV_ROUNDS); after setup, which builds the primitive
#   tools/device.sh kvdevice      Nsight Compute metrics of kernel's and kernel_kv's launches
#                                 (tools/kv_probe.py under ncu, L2 flushed and not; KV_MODEL)
#   tools/device.sh sizes         kernel and kernel_kv against graph on every Qwen3 size in the
#                                 registry (SIZES_MODELS, SIZES_ROUNDS, SIZES_TIMEOUT_S)
#   tools/device.sh firstprobe    which operation holds a fresh process's first-use cost, part by
#                                 part, first and second call, in two processes (PROBE_MODEL)
#   tools/device.sh servernoise   the mlx-lm server engine's per-request spread under CPU
#                                 placements switched on one pair of servers, then a pair with a
#                                 shorter thread switch interval (NOISE_MODEL, NOISE_LAYOUTS,
#                                 NOISE_ROUNDS, NOISE_TOKENS, NOISE_SWITCH_US; empty skips the
#                                 second pair)
#   tools/device.sh server M...   the mlx-lm server engine's pipeline on models M (PIN=N: each
#                                 arm's server on N cores of its own, server.cpus_per_arm)
#
# Machine-specific places, from variables (defaults in brackets):
#   SITE_PACKAGES  where MLX's CUDA build is installed [/tmp/site] (../shared/device/README.md)
#   NCU_DIR        Nsight Compute's folder [the newest /opt/nvidia/nsight-compute/*]
#   CUDA_BIN       nvcc's folder [/usr/local/cuda/bin]
#   NO_TORCH=1     every process in a venv that sees this machine's packages but PyTorch [0]
set -uo pipefail
stage="${1:?usage: tools/device.sh kernel|pipeline}"
OUT="${OUT:-$PWD/.work/device-out}"
final="$OUT"
OUT="$final/raw"   # everything lands here, then travels back packed as one file
mkdir -p "$OUT"
pack() { tar -C "$final" -czf "$final/$stage-outputs.tar.gz" raw && rm -rf "$OUT"; }
trap pack EXIT
SITE_PACKAGES="${SITE_PACKAGES:-/tmp/site}"
NCU_DIR="${NCU_DIR:-$(ls -d /opt/nvidia/nsight-compute/*/ 2>/dev/null | tail -1)}"
export PATH="$PATH:${CUDA_BIN:-/usr/local/cuda/bin}:$NCU_DIR"
export PYTHONPATH="$SITE_PACKAGES:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# fusedqk's processes keep synthetic checkpoints and MLX's compiled kernels in ~/.cache/fusedqk
# (FUSEDQK_CACHE_DIR, docs/configuration.md): empty on a freshly started machine.
export PYTHONUNBUFFERED=1
py=python3

# NO_TORCH=1: run every process in a venv of this machine's interpreter that sees the same
# packages except PyTorch's. This machine's transformers sits beside PyTorch and importing mlx-lm
# imports it (13-15 s a process on 2026-12-03; USE_TORCH=0 did not keep it out); fusedqk's own
# environments (containers/, pyproject.toml) install no PyTorch, so this is the start-up they pay.
hide_torch() {
  local site base
  site="$(python3 -c 'import importlib.util as u, os; print(os.path.dirname(list(u.find_spec("torch").submodule_search_locations)[0]))' 2>/dev/null)" \
    || { echo "NO_TORCH: no PyTorch here, nothing to hide"; return 0; }
  base="$(python3 -c 'import sys; print(sys._base_executable)')"
  rm -rf /tmp/no-torch /tmp/no-torch-site && mkdir -p /tmp/no-torch-site
  for entry in "$site"/*; do
    case "$(basename "$entry")" in torch*|functorch*|triton*) continue ;; esac
    ln -s "$entry" /tmp/no-torch-site/
  done
  "$base" -m venv --without-pip /tmp/no-torch || { echo "NO_TORCH: venv failed, PyTorch stays"; return 0; }
  echo 'import site; site.addsitedir("/tmp/no-torch-site")' > \
    "$(/tmp/no-torch/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine-packages.pth"
  py=/tmp/no-torch/bin/python3
  export PATH="/tmp/no-torch/bin:$PATH"
  $py -c "import mlx_lm.utils, importlib.util as u, sys; print('NO_TORCH:', sys.executable, 'torch importable:', u.find_spec('torch') is not None)" \
    | tee "$OUT/no-torch.txt"
}
[ "${NO_TORCH:-0}" = 1 ] && hide_torch

# The optional C++ primitive (fusedqk build-ext), with fmt's headers from the .deb that travels
# in .whl/ (the stage that installs); the module lands in the tree and stays there for later calls on a warm machine.
build_ext() {
  local fmt_deb fmt_args=()
  fmt_deb="$(ls .whl/*/libfmt-dev_*.deb 2>/dev/null | head -1)"
  if [ -n "$fmt_deb" ]; then
    dpkg -x "$fmt_deb" /tmp/fmt && fmt_args=(--fmt-include /tmp/fmt/usr/include)
  fi
  $py -m fusedqk build-ext --build-dir /tmp/ext-build "${fmt_args[@]}" 2>&1 | tee "$OUT/build-ext.txt"
  cp /tmp/ext-build/build.log "$OUT/build-ext.log" 2>/dev/null
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
$py -m fusedqk env | tee "$OUT/env.txt"

case "$stage" in
setup)
  # The wheels are installed with --no-compile: this writes their bytecode once, so no process
  # compiles them. This machine's transformers sits beside PyTorch, which fusedqk's own
  # environments do not install; the import is timed with and without USE_TORCH=0 (on 2026-12-03
  # both imported PyTorch and took 13-15 s: that variable did not keep it out).
  started=$SECONDS
  $py -m compileall -q -j 0 "$SITE_PACKAGES" > "$OUT/compileall.txt" 2>&1
  echo "bytecode: $((SECONDS - started)) s" | tee "$OUT/setup.txt"
  for torch in $([ "${SETUP_IMPORTS:-1}" = 0 ] || echo auto 0); do
    for i in 1 2; do
      /usr/bin/time -f "import mlx_lm, USE_TORCH=$torch: %e s" env USE_TORCH=$torch \
        $py -c "import mlx_lm.utils, mlx_lm.tokenizer_utils; import sys; print('torch imported:', 'torch' in sys.modules)" \
        2>&1 | tee -a "$OUT/setup.txt"
    done
  done
  build_ext | tail -2
  $py -m fusedqk env | grep "kernel call"
  ;;
kernel)
  $py tools/probe_cuda_numerics.py 2>&1 | tee "$OUT/probe.md"
  $py -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests 2>&1 \
    | tee "$OUT/gpu-tests.txt" | tail -40
  : > "$OUT/blockbench.md"
  for m in qwen3-0.6b qwen3-8b qwen3-30b-a3b; do
    $py -m fusedqk blockbench -m "$m" --out-dir "$OUT/bb-$m" >> "$OUT/blockbench.md" 2>&1
  done
  # Device time of the kernels alone (no launch gaps): Nsight Compute, clocks left as they are.
  if command -v ncu >/dev/null; then
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
profile)
  # Where the fused kernel's time goes: Nsight Compute's sections for one launch per model.
  for m in qwen3-0.6b qwen3-8b; do
    ncu --clock-control none -k regex:fusedqk -s 2 -c 1 --section SpeedOfLight \
      --section LaunchStats --section Occupancy --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section SchedulerStats \
      $py tools/kernel_time.py "$m" > "$OUT/profile-$m.txt" 2>&1
    grep -vE "^==PROF==|^\s*$" "$OUT/profile-$m.txt" | head -120
  done
  ;;
pipeline)
  # The pipeline itself, natively (no container engine here), into an ignored directory that
  # survives between calls on a warm machine: a second call resumes what a first one began. A
  # machine that went cold resumes from the partial run a previous call brought back, carried
  # as .work/resume.tar.gz. RUN_NAME and FUSEDQK_GIT_COMMIT come from the caller (this copy of
  # the tree has no .git). Snakemake stops cleanly before the device tool's 10-minute limit.
  # BUILD_EXT=1 builds the C++ primitive first, so that the run calls the kernel through it.
  : "${RUN_NAME:?set RUN_NAME}" "${FUSEDQK_GIT_COMMIT:?set FUSEDQK_GIT_COMMIT}"
  [ "${BUILD_EXT:-0}" = 1 ] && build_ext && $py -m fusedqk env | grep "kernel call"
  if ! ls -d .work/results/cuda-*/"$RUN_NAME" >/dev/null 2>&1 && [ -f .work/resume.tar.gz ]; then
    mkdir -p .work/results && tar -C .work/results -xzf .work/resume.tar.gz
  fi
  # PIPELINE_ARGS: more Snakemake arguments, e.g. --configfile config/cuda-kernel-only.yaml.
  # PIPELINE_TIMEOUT_S: at most 540 in a 600-second call. Snakemake takes up to ~40 s to stop its
  # jobs after the interrupt, and the run comes back only if this script reaches its end: on
  # 2026-12-01 a call with 560 was killed before packing, and left Snakemake's lock behind.
  smk=($py -m snakemake --config 'backends=[cuda]' results_dir=.work/results run_name="$RUN_NAME")
  # MLX's compiled kernels from an earlier machine of this kind (they are keyed by GPU kind and
  # MLX version): carried as .work/ptx-cache.tar.gz, they spare this machine the compilation
  # (docs/perf-log.md, 2026-12-02/03). The folder goes back at the end, for the next call.
  [ -f .work/ptx-cache.tar.gz ] && mkdir -p ~/.cache/fusedqk && tar -C ~/.cache/fusedqk -xzf .work/ptx-cache.tar.gz
  # A lock left by a killed Snakemake blocks the resume; no other Snakemake runs on this machine.
  pgrep -f "snakemake.*--cores" >/dev/null || "${smk[@]}" --unlock >/dev/null 2>&1
  started=$SECONDS
  timeout -s INT "${PIPELINE_TIMEOUT_S:-540}" "${smk[@]}" --cores all --rerun-incomplete \
    ${PIPELINE_ARGS:-} 2>&1 | tee "$OUT/snakemake.log" | grep -E "Finished|Error|steps" | tail -30
  echo "pipeline wall time: $((SECONDS - started)) s" | tee "$OUT/pipeline-wall.txt"
  du -sh ~/.cache/fusedqk/* 2>/dev/null | tee -a "$OUT/pipeline-wall.txt"
  [ -d ~/.cache/fusedqk/ptx ] && tar -C ~/.cache/fusedqk -czf "$final/ptx-cache.tar.gz" ptx
  run_dir=$(ls -d .work/results/cuda-*/"$RUN_NAME" 2>/dev/null | head -1)
  if [ -n "$run_dir" ]; then  # complete or not, it comes back
    tar -C .work/results -czf "$final/run.tar.gz" "$(basename "$(dirname "$run_dir")")/$RUN_NAME"
    ls "$run_dir"/*/status-*.json 2>/dev/null
    [ -f "$run_dir/report.md" ] && sed -n '1,30p;/^## Where the time went/,/^Wall:/p' "$run_dir/report.md"
  fi
  ;;
after)
  # GPU_TESTS=0: only the start to first token (the tests take ~3.5 minutes).
  if [ "${GPU_TESTS:-1}" = 1 ]; then
    build_ext
    $py -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests 2>&1 \
      | tee "$OUT/gpu-tests.txt" | tail -8
    FUSEDQK_KERNEL_CALL=cuda_kernel $py -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_gpu.py \
      2>&1 | tee "$OUT/gpu-tests-cuda_kernel.txt" | tail -3
    $py -m pytest -q -p no:cacheprovider tests/test_server_engine.py -k pinned 2>&1 | tail -2
  fi
  # A process's start to its first decoded token, with the caches the pipeline left.
  for i in 1 2; do
    $py -m fusedqk generate -m qwen3-30b-a3b -p 64 -n 128 --json > "$OUT/first-token-$i.json"
  done
  $py tools/generate_table.py first-token- "$OUT"/first-token-*.json | tee "$OUT/first-token.md"
  ;;
server)
  # The mlx-lm server engine on the models named, into $OUT/server-results; PIN=N writes a
  # copy of its engine file with server.cpus_per_arm N.
  shift
  engine=config/engines/mlx-lm-server.yaml
  if [ -n "${PIN:-}" ]; then
    engine=.work/mlx-lm-server-pinned.yaml
    $py -c "import sys, yaml; d = yaml.safe_load(open('config/engines/mlx-lm-server.yaml'));
d['server']['cpus_per_arm'] = int(sys.argv[1]); yaml.safe_dump(d, open(sys.argv[2], 'w'))" "$PIN" "$engine"
  fi
  models="[$(echo "$@" | tr ' ' ',')]"
  # The run is written under $OUT, so that it comes back however the call ends (on 2026-12-03 a
  # call's own limit ended one during identity, and a finished bench was lost with it).
  results="$OUT/server-results"
  timeout -s INT "${PIPELINE_TIMEOUT_S:-540}" $py -m snakemake --cores all \
    --configfile config/cuda-mlx-lm-server.yaml \
    --config 'backends=[cuda]' results_dir="$results" run_name="${RUN_NAME:-server}" \
    "backend_settings={cuda: {engine: $engine, models: $models}}" ${PIPELINE_ARGS:-} 2>&1 \
    | tee "$OUT/snakemake.log" | grep -E "Finished|Error|steps" | tail -20
  run_dir=$(ls -d "$results"/cuda-*/"${RUN_NAME:-server}" 2>/dev/null | head -1)
  if [ -n "$run_dir" ]; then
    grep -h "rounds\|half-width\|speedup" "$run_dir"/logs/*-bench.log | tail -12
    [ -f "$run_dir/report.md" ] && sed -n '1,25p' "$run_dir/report.md"
  fi
  ;;
primitive)
  # The optional C++ primitive: built here (nanobind 3.x and fmt's headers travel in .whl/b),
  # then every GPU test through both kernel calls, then blockbench with the primitive's rows and
  # mx.fast.cuda_kernel's side by side. The module stays in the tree for later calls.
  build_ext
  $py -m fusedqk env > "$OUT/env-primitive.txt" 2>&1; tail -1 "$OUT/env-primitive.txt"
  $py -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests 2>&1 \
    | tee "$OUT/gpu-tests.txt" | tail -15
  for m in qwen3-0.6b qwen3-8b qwen3-30b-a3b; do
    $py -m fusedqk blockbench -m "$m" --out-dir "$OUT/bb-$m" > "$OUT/bb-$m.md" 2>&1
  done
  $py - "$OUT" <<'PY' | tee "$OUT/primitive.md"
import json, sys
from pathlib import Path
paths = ("graph", "composite", "kernel", "launch", "kernel-cuda_kernel", "launch-cuda_kernel")
print("| model | " + " | ".join(paths) + " | kernel vs graph | launch floor vs graph |")
print("|---|" + "---|" * (len(paths) + 2))
for f in sorted(Path(sys.argv[1]).glob("bb-*/blockbench.json")):
    rows = {r["path"]: r for r in json.loads(f.read_text())["rows"]}
    us = [f"{rows[p]['layer_us']:.1f}" if p in rows else "—" for p in paths]
    g = rows["graph"]["layer_us"]
    print(f"| {f.parent.name[3:]} | " + " | ".join(us) + f" | {g / rows['kernel']['layer_us']:.2f}"
          f" | {g / rows['launch']['layer_us']:.2f} |")
print("kernel call:", {r.get("kernel_call") for f in Path(sys.argv[1]).glob("bb-*/blockbench.json")
                       for r in json.loads(f.read_text())["rows"] if r["path"] == "kernel"})
PY
  ;;
launchfloor)
  for rep in $(seq "${2:-3}"); do
    for m in qwen3-0.6b qwen3-8b qwen3-30b-a3b; do
      $py -m fusedqk blockbench -m "$m" --paths graph,kernel,launch --out-dir "$OUT/lf-$rep-$m" \
        > "$OUT/lf-$rep-$m.md" 2>&1
    done
  done
  $py - "$OUT" <<'PY' | tee "$OUT/launchfloor.md"
import json, sys
from pathlib import Path
print("| repeat | model | graph µs/layer | kernel | launch floor | kernel vs graph | launch floor vs graph |")
print("|---|---|---|---|---|---|---|")
for f in sorted(Path(sys.argv[1]).glob("lf-*/blockbench.json")):
    rep, model = f.parent.name.split("-", 2)[1:]
    rows = {r["path"]: r for r in json.loads(f.read_text())["rows"]}
    g, k, l = (rows[p]["layer_us"] for p in ("graph", "kernel", "launch"))
    print(f"| {rep} | {model} | {g:.1f} | {k:.1f} | {l:.1f} | {g / k:.2f} | {g / l:.2f} |")
PY
  ;;
breakdown)
  # fusedqk's decode loop and mlx-lm's single-sequence and batched loops in-process (no HTTP),
  # per arm, twice each (tools/server_breakdown.py, BREAKDOWN_REPEATS repeats per process), from
  # the checkpoints a server-engine pipeline exported.
  for m in ${BREAKDOWN_MODELS:-qwen3-0.6b qwen3-8b qwen3-30b-a3b}; do
    # A pipeline's export carries a content suffix (…-s0-<hash>); use it where there is one.
    ck="$(ls -d "$HOME/.cache/fusedqk/checkpoints/$m-q4g64-bfloat16-s0"* 2>/dev/null | head -1)"
    ck="${ck:-$HOME/.cache/fusedqk/checkpoints/$m-q4g64-bfloat16-s0}"
    [ -f "$ck/config.json" ] || $py -m fusedqk export "$m" --out "$ck" > /dev/null
    for arm in 0 1 0 1; do
      FUSEDQK_FUSED_QK_NORM=$arm $py tools/server_breakdown.py "$ck" --repeats "${BREAKDOWN_REPEATS:-6}" \
        >> "$OUT/breakdown.jsonl" 2>> "$OUT/breakdown.err"
    done
  done
  $py - "$OUT/breakdown.jsonl" <<'PY' | tee "$OUT/breakdown.md"
import json, sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    doc = json.loads(line)
    rows[(doc["checkpoint"].rsplit("/", 1)[-1], doc["toggle"])].append(doc)
loops = ("builtin", "single", "batched")
print("| checkpoint | FUSEDQK_FUSED_QK_NORM | fusedqk loop ms/token | single-sequence ms/token | batched ms/token |")
print("|---|---|---|---|---|")
for (ck, arm), docs in sorted(rows.items()):
    cells = [" / ".join(f"{d[f'{loop}_ms_per_token']:.3f}" for d in docs) for loop in loops]
    print(f"| {ck} | {arm} | {' | '.join(cells)} |")
PY
  ;;
warmup)
  # Where a fresh process's time to its first token goes (WARMUP_MODEL, qwen3-0.6b): an empty
  # cache folder, then the same folder again (MLX's compiled kernels on disk), again under
  # cProfile, and again with cuDNN's attention off (WARMUP_RUNS picks some of these, in order).
  # Each run's kernel-cache file count comes with it.
  cache=/tmp/warmup-cache
  rm -rf "$cache"
  runs=(${WARMUP_RUNS:-cold warm profiled no-cudnn}); files=()
  for run in "${runs[@]}"; do
    files+=("$OUT/warmup-$run.json")
    env=(FUSEDQK_CACHE_DIR="$cache"); prof=()
    [ "$run" = no-cudnn ] && env+=(MLX_CUDA_USE_CUDNN_SDPA=0)
    [ "$run" = profiled ] && prof=(-m cProfile -o "$OUT/warmup.prof")
    started=$SECONDS
    env "${env[@]}" timeout "${WARMUP_TIMEOUT_S:-150}" $py "${prof[@]}" -m fusedqk generate -m "${WARMUP_MODEL:-qwen3-0.6b}" -p 64 -n 32 --json \
      > "$OUT/warmup-$run.json" 2> "$OUT/warmup-$run.err"
    echo "$run $((SECONDS - started)) s, kernel cache files: $(ls "$cache"/ptx/*/ 2>/dev/null | wc -l)" \
      | tee -a "$OUT/warmup-files.txt"
  done
  $py tools/generate_table.py warmup- "${files[@]}" | tee "$OUT/warmup.md"
  [ -f "$OUT/warmup.prof" ] && $py -c "import pstats, sys
pstats.Stats(sys.argv[1], stream=sys.stdout).sort_stats('tottime').print_stats(25)" "$OUT/warmup.prof" \
    | tee -a "$OUT/warmup.md"
  ;;
firstuse)
  # One process per row, caches as the machine has them (run after a pipeline or a warmup):
  # --warmup 1 makes the first generate the untimed one, so warm-up s is the first prefill and
  # decode, and prefill s the second prefill in the same process.
  m="${FIRSTUSE_MODEL:-qwen3-30b-a3b}"
  # The block benchmark's first call per path (its "first call s" column): what its warm-up holds.
  $py -m fusedqk blockbench -m "${FIRSTUSE_BLOCK_MODEL:-qwen3-8b}" --out-dir "$OUT/bb" \
    > "$OUT/firstuse-blockbench.md" 2>&1; cat "$OUT/firstuse-blockbench.md"
  for row in "p64 cudnn" "p64 no-cudnn" "p1 cudnn"; do
    set -- $row; env=()
    [ "$2" = no-cudnn ] && env=(MLX_CUDA_USE_CUDNN_SDPA=0)
    env "${env[@]}" timeout "${FIRSTUSE_TIMEOUT_S:-180}" $py -m fusedqk generate -m "$m" \
      -p "${1#p}" -n 8 --warmup 1 --json > "$OUT/firstuse-$1-$2.json" 2> "$OUT/firstuse-$1-$2.err"
  done
  # warm-up s: the first prefill and 8 tokens; prefill s: the second prefill.
  $py tools/generate_table.py firstuse- "$OUT"/firstuse-*.json | tee "$OUT/firstuse.md"
  ;;
batch)
  # The fused kernel at every batch it takes, both calls (plain and cache-writing), and what MLX's
  # graph path does one batch past the limit; after setup, which builds the primitive.
  $py -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_cuda_ext.py tests/test_kernel_gpu.py \
    tests/test_kernel_kv_gpu.py -k "${BATCH_TESTS:-batch or row_by_row}" 2>&1 \
    | tee "$OUT/batch-tests.txt" | grep -E "passed|failed|batch [0-9]+:|Error" | tail -25
  ;;
llama)
  # llama.cpp for CUDA from the pinned source carried as .work/llama-src.tar.xz (`fusedqk
  # build-llama-cpp --pack-source`), timed; then the pipeline through each engine file named in
  # LLAMA_ENGINES on LLAMA_MODELS, runs written under $OUT so that they come back.
  export FUSEDQK_LLAMA_CPP_SOURCE="$PWD/.work/llama-src.tar.xz"
  $py -m fusedqk build-llama-cpp --backend cuda --source "$FUSEDQK_LLAMA_CPP_SOURCE" 2>&1 \
    | tee "$OUT/llama-build.txt" | tail -2
  cp ~/.cache/fusedqk/llama.cpp/*/build.log "$OUT/llama-build.log" 2>/dev/null
  models="[$(echo ${LLAMA_MODELS:-qwen3-0.6b qwen3-8b qwen3-30b-a3b} | tr ' ' ',')]"
  for engine in ${LLAMA_ENGINES:-llama-server llama-bench}; do
    started=$SECONDS
    timeout -s INT "${PIPELINE_TIMEOUT_S:-540}" $py -m snakemake --cores all \
      --configfile "config/cuda-$engine.yaml" --config 'backends=[cuda]' \
      results_dir="$OUT/llama-results" run_name="${RUN_NAME:-llama}-$engine" \
      "backend_settings={cuda: {models: $models}}" 2>&1 | tee "$OUT/snakemake-$engine.log" \
      | grep -E "Finished|Error|steps" | tail -5
    echo "$engine pipeline: $((SECONDS - started)) s"
    run_dir=$(ls -d "$OUT"/llama-results/cuda-*/"${RUN_NAME:-llama}-$engine" 2>/dev/null | head -1)
    [ -f "$run_dir/report.md" ] && sed -n '1,25p' "$run_dir/report.md"
  done
  ;;
kernelkv)
  # kernel_kv (the kernel writing the KV cache, through the C++ primitive, built by setup): its
  # GPU tests on the models KV_TESTS selects, then its block and node counts beside kernel's.
  $py -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_kv_gpu.py \
    -k "${KV_TESTS:-0.6b or without_the_primitive}" 2>&1 | tee "$OUT/kernel-kv-tests.txt" | tail -15
  $py -m fusedqk blockbench -m "${KV_MODEL:-qwen3-0.6b}" --paths graph,kernel,kernel_kv \
    --out-dir "$OUT/bb-kv" 2>&1 | tee "$OUT/kernel-kv-blockbench.md"
  # Device time per launch, kernel against kernel_kv (Nsight Compute, clocks left alone): whether
  # kernel_kv's extra time per layer is on the GPU or on the host.
  timeout 240 ncu --clock-control none --csv --metrics gpu__time_duration.sum -k regex:fusedqk \
    -c 224 $py -m fusedqk blockbench -m "${KV_MODEL:-qwen3-0.6b}" --paths kernel,kernel_kv \
    --reps 3 -w 0 --bandwidth 3400 > "$OUT/kernel-kv-ncu.csv" 2> "$OUT/kernel-kv-ncu.err"
  $py tools/ncu_metrics.py "$OUT/kernel-kv-ncu.csv" | tee "$OUT/kernel-kv-ncu.md"
  # The same launch into cache buffers made in different ways (tools/kv_probe.py).
  timeout 120 $py tools/kv_probe.py "${KV_MODEL:-qwen3-0.6b}" 2>&1 | tee "$OUT/kv-probe.md"
  # Decode, the three paths taking turns (KV_ROUNDS rounds; 0 skips it).
  if [ "${KV_ROUNDS:-8}" != 0 ]; then
    $py -m fusedqk bench -m "${KV_MODEL:-qwen3-0.6b}" --paths graph,kernel,kernel_kv \
      -r "${KV_ROUNDS:-8}" --out-dir "$OUT/bench-kv" 2>&1 | tee "$OUT/kernel-kv-bench.md" | tail -8
  fi
  ;;
kvdevice)
  # Where kernel_kv's extra device time per launch goes: Nsight Compute metrics of the launches
  # of tools/kv_probe.py (the plain kernel and kernel_kv, the same grid and body but the cache
  # index), with the L2 flushed before each launch (ncu's default) and not; then the median of
  # each metric per kernel (tools/ncu_metrics.py).
  build_ext | tail -1
  metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum
  metrics+=,launch__grid_size,launch__registers_per_thread,smsp__inst_executed.sum
  metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active,lts__t_sectors_op_write.sum
  for cache in all none; do
    timeout 150 ncu --clock-control none --cache-control "$cache" --csv --metrics "$metrics" \
      -k regex:fusedqk -c 400 $py tools/kv_probe.py "${KV_MODEL:-qwen3-0.6b}" --reps 3 \
      > "$OUT/kv-ncu-$cache.csv" 2> "$OUT/kv-ncu-$cache.err"
  done
  $py tools/ncu_metrics.py "$OUT"/kv-ncu-*.csv | tee "$OUT/kv-ncu.md"
  ;;
sizes)
  # kernel and kernel_kv against graph on every Qwen3 size in the registry (SIZES_MODELS,
  # SIZES_ROUNDS rounds each, SIZES_TIMEOUT_S per model), then one table of the speedups.
  models="${SIZES_MODELS:-$($py -m fusedqk models | awk 'NR > 1 && $1 ~ /^qwen3-/ && $1 !~ /tiny/ {print $1}')}"
  for m in $models; do
    timeout "${SIZES_TIMEOUT_S:-240}" $py -m fusedqk bench -m "$m" --paths graph,kernel,kernel_kv \
      -r "${SIZES_ROUNDS:-6}" --out-dir "$OUT/sizes/$m" > "$OUT/sizes-$m.md" 2>&1 \
      || echo "$m: bench did not finish (exit $?)" | tee -a "$OUT/sizes-failed.txt"
    rm -f "$OUT/sizes/$m/tokens.csv"
  done
  $py - "$OUT/sizes" <<'PY' | tee "$OUT/sizes.md"
import json, pathlib, sys
print("| model | rounds | kernel vs graph [95 % CI] | kernel_kv vs graph [95 % CI] |")
print("|---|---|---|---|")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/bench.json")):
    doc = json.loads(f.read_text())
    sp = {s["path"]: s for s in doc["speedups"]}
    cell = lambda p: (f"{sp[p]['point']:.3f} [{sp[p]['lo']:.3f}, {sp[p]['hi']:.3f}]" if p in sp
                      else "-")
    print(f"| {f.parent.name} | {doc['summary'][0]['rounds']} | {cell('kernel')} | {cell('kernel_kv')} |")
PY
  ;;
firstprobe)
  # Which operation holds a fresh process's first-use cost (tools/first_use.py), in two
  # processes one after the other: the first may compile kernels into the folder, the second
  # finds them there, so what its first calls still pay is built per process.
  m="${PROBE_MODEL:-qwen3-30b-a3b}"
  for i in 1 2; do
    timeout "${PROBE_TIMEOUT_S:-200}" $py tools/first_use.py "$m" > "$OUT/first-use-$i.md" \
      2> "$OUT/first-use-$i.err"
    echo "process $i:"; sed -n '/^| part/,$p' "$OUT/first-use-$i.md"
  done
  ;;
servernoise)
  # What sets the mlx-lm server engine's per-request speed: CPU placements switched block by
  # block on one running pair of servers (tools/server_noise.py), with the GPU's clocks, power
  # and utilization sampled every 100 ms beside it (each request's start and end are recorded).
  fields=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,temperature.gpu
  nvidia-smi --query-gpu=$fields --format=csv -lms 100 > "$OUT/gpu-clocks.csv" 2>&1 &
  clocks=$!
  nvidia-smi --query-gpu=timestamp,clocks_event_reasons.active --format=csv -lms 100 \
    > "$OUT/gpu-clock-reasons.csv" 2>&1 &
  reasons=$!
  $py tools/server_noise.py config/engines/mlx-lm-server.yaml "${NOISE_MODEL:-qwen3-0.6b}" \
    --layouts "${NOISE_LAYOUTS:-unpinned,rot1,rot2}" --rounds "${NOISE_ROUNDS:-16}" \
    --tokens "${NOISE_TOKENS:-16}" --out "$OUT/server-noise.jsonl" 2> "$OUT/server-noise.err" \
    | tee "$OUT/server-noise.md"
  # The same pair started again with a 0.5 ms thread switch interval (CPython's is 5 ms).
  if [ -n "${NOISE_SWITCH_US-500}" ]; then
    $py tools/server_noise.py config/engines/mlx-lm-server.yaml "${NOISE_MODEL:-qwen3-0.6b}" \
      --layouts unpinned --rounds "${NOISE_ROUNDS:-16}" --switch-interval-us "${NOISE_SWITCH_US-500}" \
      --out "$OUT/server-noise-switch.jsonl" 2> "$OUT/server-noise-switch.err" \
      | tee "$OUT/server-noise-switch.md"
  fi
  kill "$clocks" "$reasons" 2>/dev/null
  lscpu > "$OUT/lscpu.txt" 2>&1; lscpu -e >> "$OUT/lscpu.txt" 2>&1
  ;;
serverlen)
  # The mlx-lm server engine's bench in several round shapes (SERVERLEN_SHAPES: GxC, G timed
  # tokens per arm and round in turns of C), each within SERVERLEN_BUDGET_S of rounds, the list
  # run SERVERLEN_PASSES times so that every shape meets the host's slow and fast stretches.
  # Which reaches a narrower interval per second of rounds: the projection to 240 s is
  # 1.96 x SD(log round speedup) x sqrt(s per round / 240).
  m="${SERVERLEN_MODEL:-qwen3-0.6b}"
  mkdir -p "$OUT/serverlen"
  for pass in $(seq "${SERVERLEN_PASSES:-1}"); do
    for shape in ${SERVERLEN_SHAPES:-16x16 128x16}; do
      g="${shape%x*}" c="${shape#*x}" dir="$OUT/serverlen/p$pass-g$g-c$c"
      timeout "${SERVERLEN_TIMEOUT_S:-230}" $py -m fusedqk bench --engine config/engines/mlx-lm-server.yaml \
        -m "$m" -g "$g" -c "$c" -r 10 --target-half-width 0.005 --max-rounds 2000 \
        --max-measure-s "${SERVERLEN_BUDGET_S:-150}" --out-dir "$dir" \
        > "$dir.md" 2> "$dir.err" || echo "$shape pass $pass: exit $?"
    done
  done
  $py - "$OUT/serverlen" <<'PY'
import json, math, pathlib, sys
import numpy as np
print("| pass | G x C | rounds | s per round | speedup [95 % CI] | half-width | SD log round speedup | projected half-width at 240 s |")
print("|---|---|---|---|---|---|---|---|")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/bench.json")):
    d = json.loads(f.read_text())
    sp = d["speedups"][0]
    r = np.log(sp["round_speedups"])
    wall = float(np.mean(d["meta"]["round_wall_s"]))
    sd = float(np.std(r, ddof=1))
    p, g, c = f.parent.name.split("-")
    print(f"| {p[1:]} | {g[1:]} x {c[1:]} | {len(r)} | {wall:.3f} | {sp['point']:.3f} [{sp['lo']:.3f}, {sp['hi']:.3f}] "
          f"| {(sp['hi'] - sp['lo']) / 2 / sp['point']:.1%} | {sd:.3f} | {1.96 * sd * math.sqrt(wall / 240):.1%} |")
PY
  ;;
variety)
  $py tools/variety.py ${VARIETY_MODELS:-qwen3-0.6b qwen3-8b qwen3-30b-a3b} 2>&1 | tee "$OUT/variety.md"
  ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
