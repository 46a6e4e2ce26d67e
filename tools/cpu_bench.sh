#!/usr/bin/env bash
# The CPU engine's numbers in one command: builds bench_gemm and
# bench_moe_layer (Release, -march=native, OpenMP; OpenBLAS where its OpenMP
# build is installed), runs them at 2 and 1 threads, then the PyTorch CPU
# baseline (bench/torch_moe_cpu.py) at the same thread counts where a Python
# with torch is found, and prints the PyTorch ratios:
#
#   tools/cpu_bench.sh [--cpu_time] [--reps N] [--encoder]
#
# --cpu_time  bench_gemm's rates per CPU second of the process (for a machine
#             shared with other jobs; the PyTorch ratios stay wall-clock)
# --reps N    Google Benchmark repetitions (median kept; default 3)
# --encoder   instead: the BERT encoder (bench_encoder: fp32 from the views,
#             packed fp32 / bf16 / int8) beside the FMA peak and the engine's
#             and OpenBLAS's SGEMM (bench_gemm), and bench/torch_encoder.py in
#             fp32 / bf16 / dynamic int8 at 1 and 2 threads; with --cpu_time
#             both sides compare CPU time of the process (results:
#             gemm_ceilings.json, encoder.json / .txt, torch_encoder.txt,
#             encoder_summary.txt)
#
# Python: $MOEKIT_TORCH_PYTHON (a Python with PyTorch 2.x; installing one
# pulls large wheels, so it is never part of CI), else python3. Results go to
# build/bench-cpu/results: gemm.txt, moe_layer.txt, torch.jsonl, summary.txt.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${MOEKIT_CPU_BENCH_BUILD:-$root/build/bench-cpu}
cpu_time=""
reps=3
encoder=""
while (($#)); do
  case $1 in
    --cpu_time) cpu_time=--cpu_time ;;
    --reps) reps=$2; shift ;;
    --encoder) encoder=1 ;;
    *) echo "usage: $0 [--cpu_time] [--reps N] [--encoder]" >&2; exit 2 ;;
  esac
  shift
done

cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEKIT_ENABLE_CUDA=OFF \
  -DMOEKIT_BUILD_TESTS=OFF -DMOEKIT_BUILD_EXAMPLES=OFF >/dev/null
out=$build/results
mkdir -p "$out"
export OMP_WAIT_POLICY=PASSIVE
python=${MOEKIT_TORCH_PYTHON:-python3}

if [[ -n $encoder ]]; then
  cmake --build "$build" --target bench_gemm bench_encoder
  uptime | tee "$out/load.txt"
  echo "== bench_gemm (ceilings)"
  "$build/bench/bench_gemm" $cpu_time --benchmark_filter='^(fma_peak|sgemm)/' \
    --benchmark_repetitions="$reps" --benchmark_report_aggregates_only=true \
    --benchmark_out="$out/gemm_ceilings.json" --benchmark_out_format=json
  echo "== bench_encoder"
  "$build/bench/bench_encoder" $cpu_time --benchmark_repetitions="$reps" \
    --benchmark_report_aggregates_only=true --benchmark_out="$out/encoder.json" \
    --benchmark_out_format=json | tee "$out/encoder.txt"
  if ! "$python" -c 'import torch' 2>/dev/null; then
    echo "== no PyTorch for $python: the PyTorch ratios are skipped"
    exit 0
  fi
  echo "== PyTorch ($python)"
  "$python" "$root/bench/torch_encoder.py" --threads 2 1 --repeats $((reps * 3)) \
    --dtype fp32 bf16 int8 | tee "$out/torch_encoder.txt"
  "$python" "$root/tools/encoder_bench_summary.py" "$out" $cpu_time | tee "$out/encoder_summary.txt"
  exit 0
fi

cmake --build "$build" --target bench_gemm bench_moe_layer
uptime | tee "$out/load.txt"

echo "== bench_gemm"
"$build/bench/bench_gemm" $cpu_time --benchmark_repetitions="$reps" \
  --benchmark_report_aggregates_only=true | tee "$out/gemm.txt"

echo "== bench_moe_layer (C1, C2)"
"$build/bench/bench_moe_layer" --benchmark_filter='^(layer_[a-z0-9_]*|experts_fwd[a-z0-9_]*|dense_gemm|sgemm_ceiling)/(C1|C2|n2048)' --benchmark_repetitions="$reps" \
  --benchmark_report_aggregates_only=true | tee "$out/moe_layer.txt"

if ! "$python" -c 'import torch' 2>/dev/null; then
  echo "== no PyTorch for $python: the PyTorch ratios are skipped"
  exit 0
fi
echo "== PyTorch ($python)"
: >"$out/torch.jsonl"
for threads in 2 1; do
  "$python" "$root/bench/torch_moe_cpu.py" --threads "$threads" --reps "$reps" | tee -a "$out/torch.jsonl"
done

# moekit's layer and expert times beside PyTorch's (medians, ms).
"$python" - "$out" <<'EOF' | tee "$out/summary.txt"
import json, re, sys
out = sys.argv[1]
ms = {}
for line in open(f"{out}/moe_layer.txt"):
    m = re.match(r"(\S+?)(?:/real_time)?_median\s+([\d.]+) ms", line)
    if m:
        ms[m.group(1)] = float(m.group(2))
gemm = {}
for line in open(f"{out}/gemm.txt"):
    m = re.match(r"(\S+?)(?:/real_time|/process_time)?_median\s+([\d.]+) ms\s+([\d.]+) ms", line)
    if m:
        gemm[m.group(1)] = float(m.group(2))
print(f"{'cfg':4} {'dtype':5} {'thr':>3} {'layer_fwd ms':>13} {'torch ms':>9} {'speedup':>8} "
      f"{'fwd+bwd ms':>11} {'torch ms':>9} {'speedup':>8} {'gemm_fwd':>9} {'torch':>7} {'speedup':>8}")
for line in open(f"{out}/torch.jsonl"):
    t = json.loads(line)
    name, thr = t["name"], t["threads"]
    key = f"{name}_E8_K2" if name == "C1" else f"{name}_E64_K8"
    # moekit's layer trained with the experts' products in the same dtype.
    suffix = "" if t["dtype"] == "fp32" else "_bf16"
    layer_fwd = ms.get(f"layer_fwd{suffix}/{key}/threads:{thr}", 0.0)
    layer_fb = ms.get(f"layer_fwd_bwd{suffix}/{key}/threads:{thr}", 0.0)
    engine = "engine" if t["dtype"] == "fp32" else "engine_bf16"
    gf = gemm.get(f"experts_fwd_{name}/{engine}/threads:{thr}", 0.0)
    ratio = lambda a, b: b / a if a > 0 and b > 0 else 0.0
    print(f"{name:4} {t['dtype']:5} {thr:3d} {layer_fwd:13.1f} {t['layer_fwd_ms']:9.1f} "
          f"{ratio(layer_fwd, t['layer_fwd_ms']):7.2f}x {layer_fb:11.1f} {t['layer_fwd_bwd_ms']:9.1f} "
          f"{ratio(layer_fb, t['layer_fwd_bwd_ms']):7.2f}x {gf:9.1f} {t['gemm_fwd_ms']:7.1f} "
          f"{ratio(gf, t['gemm_fwd_ms']):7.2f}x")
print("speedup = PyTorch time / moekit time (> 1: moekit faster); gemm_fwd = the experts' forward "
      "GEMMs (bench_gemm experts_fwd, bf16 on packed weights) against PyTorch's loop; "
      "torch " + json.loads(open(f"{out}/torch.jsonl").readline())["torch"])
EOF
