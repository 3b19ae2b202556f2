#!/usr/bin/env bash
# Everything one device call does, in one script: check, benchmark, print a short table last.
# Full outputs go under $OUT (set by the device tool; defaults to ./.work/device-out here).
#
#   tools/device.sh kernel     numerics probe, GPU tests, blockbench of the three seed models
#   tools/device.sh profile    Nsight Compute sections of one fused-kernel launch
#   tools/device.sh pipeline   the Snakemake pipeline, cuda backend, natively; archive packed
#   tools/device.sh hostcost   host cost of one fused-kernel call, plain and under mx.compile
#   tools/device.sh determinism [models]   where the graph path stops reproducing itself, and
#                              identity with the context kept below that point (-n 200)
#   tools/device.sh noise      is the two-speed decode the host or the GPU; does pinning the
#                              process to CPUs help the bench; cuDNN attention and determinism;
#                              the floor of a custom-kernel call
#   tools/device.sh parts      device time of fused-kernel variants (Nsight Compute)
#   tools/device.sh graphcache bench wall time with MLX's CUDA graph cache at 400 and 4000
#   tools/device.sh turns      turn length (chunk_tokens) against speedup noise and wall time
#   tools/device.sh steps      device time of whole decode steps per path (Nsight Compute)
#   tools/device.sh launchfloor [N]  blockbench's graph, kernel and launch-floor rows, N (3) times
#                              per model: the launch floor across host states
#
# Expects MLX's CUDA build importable (PYTHONPATH=/tmp/site after ../shared/device/README.md's
# two-call staging).
set -uo pipefail
stage="${1:?usage: tools/device.sh kernel|pipeline}"
OUT="${OUT:-$PWD/.work/device-out}"
final="$OUT"
OUT="$final/raw"   # everything lands here, then travels back packed as one file
mkdir -p "$OUT"
pack() { tar -C "$final" -czf "$final/$stage-outputs.tar.gz" raw && rm -rf "$OUT"; }
trap pack EXIT
export PATH="$PATH:/usr/local/cuda/bin:$(ls -d /opt/nvidia/nsight-compute/*/ 2>/dev/null | tail -1)"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=/tmp/ptx-cache
py=python3
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
$py -m fusedqk env | tee "$OUT/env.txt"

case "$stage" in
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
  : "${RUN_NAME:?set RUN_NAME}" "${FUSEDQK_GIT_COMMIT:?set FUSEDQK_GIT_COMMIT}"
  if ! ls -d .work/results/cuda-*/"$RUN_NAME" >/dev/null 2>&1 && [ -f .work/resume.tar.gz ]; then
    mkdir -p .work/results && tar -C .work/results -xzf .work/resume.tar.gz
  fi
  # PIPELINE_ARGS: more Snakemake arguments, e.g. --configfile config/cuda-kernel-only.yaml.
  timeout -s INT "${PIPELINE_TIMEOUT_S:-540}" $py -m snakemake --cores all --rerun-incomplete \
    ${PIPELINE_ARGS:-} --config 'backends=[cuda]' results_dir=.work/results run_name="$RUN_NAME" 2>&1 \
    | tee "$OUT/snakemake.log" | grep -E "Finished|Error|steps" | tail -30
  run_dir=$(ls -d .work/results/cuda-*/"$RUN_NAME" 2>/dev/null | head -1)
  if [ -n "$run_dir" ]; then  # complete or not, it comes back
    tar -C .work/results -czf "$final/run.tar.gz" "$(basename "$(dirname "$run_dir")")/$RUN_NAME"
    ls "$run_dir"/*/status-*.json 2>/dev/null
    [ -f "$run_dir/report.md" ] && sed -n '1,40p' "$run_dir/report.md"
  fi
  ;;
steps)
  # Nsight Compute costs ~0.14 s per kernel here: one step of a model is ~1-2 minutes.
  for m in ${2:-qwen3-0.6b qwen3-8b qwen3-30b-a3b}; do
    for p in graph kernel; do
      ncu --profile-from-start off --clock-control none --cache-control "${NCU_CACHE:-all}" --csv \
        --metrics gpu__time_duration.sum \
        $py tools/decode_step_time.py run "$m" "$p" > "$OUT/ncu-step-$m-$p.csv" 2>"$OUT/ncu-step-$m-$p.err"
    done
  done
  $py tools/decode_step_time.py summary "$OUT"/ncu-step-*.csv | tee "$OUT/steps.md"
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
hostcost)
  $py tools/probe_kernel_host_cost.py 2>&1 | tee "$OUT/hostcost.md"
  ;;
determinism)
  for m in ${2:-qwen3-0.6b qwen3-8b qwen3-30b-a3b}; do
    $py tools/probe_determinism.py "$m" 128,256,4096 2>&1 | tee "$OUT/determinism-$m.md"
    $py -m fusedqk identity -m "$m" --impls kernel,composite -p 32 -n 200 -k 3 \
      --out-dir "$OUT/identity-n200-$m" 2>&1 | tee "$OUT/identity-n200-$m.txt" | grep -E "cuda|control"
  done
  ;;
noise)
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,pstate,utilization.gpu \
    --format=csv,noheader,nounits -lms 200 > "$OUT/smi.csv" 2>&1 &
  smi=$!
  lscpu > "$OUT/lscpu.txt" 2>&1
  { $py tools/probe_host_noise.py 3; echo; echo "pinned: taskset -c 3"
    taskset -c 3 $py tools/probe_host_noise.py 3; } 2>&1 | tee "$OUT/host-noise.md"
  bench=(-m qwen3-0.6b --paths graph,kernel -p 64 -g 128 -r 15 -w 2 -c 4)
  for pin in none 3 2,3; do
    run=( ); [ "$pin" != none ] && run=(taskset -c "$pin")
    "${run[@]}" $py -m fusedqk bench "${bench[@]}" --out-dir "$OUT/bench-pin-$pin" \
      > "$OUT/bench-pin-$pin.md" 2>&1
    echo "pin $pin: $(grep kernel "$OUT/bench-pin-$pin.md" | head -1)"
  done
  kill "$smi"
  $py - "$OUT/smi.csv" <<'PY'
import sys, numpy as np
rows = [r.split(", ") for r in open(sys.argv[1]) if r.count(",") >= 5]
sm = np.array([float(r[1]) for r in rows]); pw = np.array([float(r[3]) for r in rows])
print(f"nvidia-smi every 200 ms ({len(rows)} samples): SM clock MHz min {sm.min():.0f} "
      f"p10 {np.percentile(sm, 10):.0f} median {np.median(sm):.0f} max {sm.max():.0f}; "
      f"power W median {np.median(pw):.0f}; pstates {sorted({r[4] for r in rows})}")
PY
  for sdpa in 1 0; do
    echo "MLX_CUDA_USE_CUDNN_SDPA=$sdpa"
    MLX_CUDA_USE_CUDNN_SDPA=$sdpa $py tools/probe_determinism.py qwen3-0.6b 256,4096
  done 2>&1 | tee "$OUT/determinism-cudnn.md"
  $py tools/probe_kernel_host_cost.py qwen3-0.6b 2>&1 | tee "$OUT/hostcost.md"
  ;;
parts)
  # Device time of kernel variants (rows per warp; without the norm + RoPE tail), ncu.
  for m in qwen3-0.6b qwen3-8b qwen3-30b-a3b; do
    ncu --clock-control none --csv --metrics gpu__time_duration.sum -k regex:fusedqk \
      $py tools/probe_kernel_parts.py "$m" > "$OUT/ncu-parts-$m.csv" 2> "$OUT/parts-$m.err"
    grep bitwise "$OUT/parts-$m.err"
  done
  (cd tools && $py probe_kernel_parts.py --summarize "$OUT"/ncu-parts-*.csv) | tee "$OUT/parts.md"
  ;;
graphcache)
  # Does MLX's CUDA graph cache make interleaved turns expensive? qwen3-30b-a3b, 3 rounds, all
  # three paths, MLX's 400 against the 4000 fusedqk bench sets by default.
  for size in 400 4000; do
    start=$SECONDS
    MLX_CUDA_GRAPH_CACHE_SIZE=$size $py -m fusedqk bench -m qwen3-30b-a3b \
      --paths graph,kernel,composite -p 64 -g 128 -r 3 -w 1 -c 4 --out-dir "$OUT/gc-$size" \
      > "$OUT/gc-$size.md" 2>&1
    wall=$((SECONDS - start))
    timed=$($py -c "import pandas as p; t = p.read_csv('$OUT/gc-$size/trials.csv'); print(round(t.decode_s.sum(), 1))")
    echo "graph cache $size: process wall $wall s, timed decode $timed s"
    grep -E "graph|kernel|composite" "$OUT/gc-$size.md" | head -3
  done
  ;;
turns)
  # Turn length C against the speedup's per-round noise and the bench's wall time (graph and
  # kernel; TURN_MODELS, TURN_ROUNDS, TURN_LENGTHS from the caller).
  for m in ${TURN_MODELS:-qwen3-0.6b qwen3-8b}; do
    for c in ${TURN_LENGTHS:-1 2 4}; do
      start=$SECONDS
      $py -m fusedqk bench -m "$m" --paths graph,kernel -p 64 -g 128 -r "${TURN_ROUNDS:-12}" -w 1 \
        -c "$c" --out-dir "$OUT/$m-c$c" > "$OUT/$m-c$c.md" 2>&1
      echo "$m $c $((SECONDS - start))" >> "$OUT/wall.txt"
    done
  done
  $py tools/summarize_turns.py "$OUT" | tee "$OUT/turns.md"
  ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
