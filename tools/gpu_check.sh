#!/usr/bin/env bash
# Every CUDA part in one go: build, tests, compute-sanitizer memcheck, the
# CUDA examples and the GPU benchmarks, ending with a short table, and the
# same shapes through a plain PyTorch loop over experts where PyTorch is.
#
#   tools/gpu_check.sh build   where the build dependencies are (nvcc, CMake,
#                              GoogleTest, Google Benchmark, Eigen): builds
#                              the CUDA targets for sm_90 into build/gpu and
#                              gathers what a run needs in build/gpu/carry
#   tools/gpu_check.sh run     on the GPU machine, which needs only the CUDA
#                              runtime and cuBLAS: runs everything from
#                              build/gpu/carry
#   tools/gpu_check.sh         both, on a machine that has it all
#
# build/gpu/carry (a few MiB: the test, benchmark and example binaries and
# the shared libraries they need beyond CUDA's and the C/C++ runtime's) is
# what to copy to a GPU machine that lacks the build dependencies. Results
# go to $OUT when set (the device tool's folder), else to
# build/gpu/results: tests.txt, memcheck.txt, racecheck.txt, synccheck.txt,
# example_*.txt, bench_*.json.
# Exits non-zero when a test, memcheck or an example fails.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${MOEKIT_GPU_BUILD:-$root/build/gpu}
step=${1:-all}

build_cuda() {
  # shellcheck source=tools/env.sh
  source "$root/tools/env.sh"
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEKIT_WERROR=ON \
    -DMOEKIT_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
  cmake --build "$build" --target moekit_cuda_tests bench_cuda_routing bench_cuda_ffn bench_cuda_lora \
    bench_cuda_moe_layer moekit_example_11_cuda_routing moekit_example_13_cuda_heads
  local carry=$build/carry
  rm -rf "$carry" && mkdir -p "$carry/lib"
  cp "$build/tests/cuda/moekit_cuda_tests" "$build/bench/bench_cuda_routing" \
    "$build/bench/bench_cuda_ffn" "$build/bench/bench_cuda_lora" "$build/bench/bench_cuda_moe_layer" \
    "$build/examples/11_cuda_routing" "$build/examples/13_cuda_heads" "$carry/"
  # Shared libraries a bare CUDA machine may lack (GoogleTest, Google Benchmark).
  ldd "$carry"/moekit_cuda_tests "$carry"/bench_cuda_routing |
    awk '/=> \// && /(gtest|gmock|benchmark)/ {print $3}' | sort -u |
    xargs -r cp -L -t "$carry/lib/"
  du -sh "$carry"
}

run_cuda() {
  local out=${OUT:-$build/results}
  mkdir -p "$out"
  local carry=$build/carry
  local tests=$carry/moekit_cuda_tests
  local status=0
  export LD_LIBRARY_PATH="$carry/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"

  echo "== tests"
  "$tests" --gtest_brief=1 2>&1 | tee "$out/tests.txt" | tail -n 5 || status=1

  echo "== compute-sanitizer memcheck on the test binary"
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
      "$tests" --gtest_brief=1 >"$out/memcheck.txt" 2>&1 || status=1
    grep -E "ERROR SUMMARY|PASSED|FAILED" "$out/memcheck.txt" | tail -n 3 || true
    # Shared-memory races and barrier misuse in the kernels that tile through
    # shared memory (a subset: racecheck is slow).
    for tool in racecheck synccheck; do
      compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 "$tests" \
        --gtest_brief=1 --gtest_filter='CudaLora*:*Head*:*Exit*:*Dispatch*' \
        >"$out/$tool.txt" 2>&1 || status=1
      echo "$tool: $(grep -E "ERROR SUMMARY" "$out/$tool.txt" | tail -n 1 || true)"
    done
  else
    echo "compute-sanitizer not found: memcheck NOT run" | tee "$out/memcheck.txt"
    status=1
  fi

  for example in 11_cuda_routing 13_cuda_heads; do
    echo "== example $example"
    "$carry/$example" >"$out/example_$example.txt" 2>&1 || status=1
    tail -n 3 "$out/example_$example.txt"
  done

  echo "== benchmarks"
  # --benchmark_min_time in plain seconds: Google Benchmark 1.7 (Debian 12's,
  # whose shared library the carry holds) rejects a "0.2s" suffix and exits.
  for bench in bench_cuda_routing bench_cuda_ffn bench_cuda_lora bench_cuda_moe_layer; do
    "$carry/$bench" --benchmark_out="$out/$bench.json" --benchmark_out_format=json \
      --benchmark_min_time=0.2 --benchmark_color=false >"$out/$bench.txt" 2>&1 || status=1
  done
  python3 - "$out"/bench_cuda_{routing,ffn,lora,moe_layer}.json <<'EOF'
import json, sys
cols = ["GB/s", "copy_GB/s", "of_copy", "TFLOP/s", "dense_TFLOP/s", "of_dense", "routing_us",
        "gemm_us", "share", "group_us", "other_share"]
print(f"{'benchmark':44} {'time_us':>9} " + " ".join(f"{c:>13}" for c in cols))
for path in sys.argv[1:]:
    for r in json.load(open(path))["benchmarks"]:
        cells = [f"{r[c]:13.3g}" if c in r else f"{'':13}" for c in cols]
        print(f"{r['name']:44} {r['real_time']:9.1f} " + " ".join(cells))
EOF

  echo "== a plain PyTorch loop over experts, on bench_cuda_ffn's shapes"
  if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    python3 "$root/bench/torch_moe_loop.py" >"$out/torch_moe_loop.jsonl" 2>"$out/torch_moe_loop.err" ||
      status=1
    python3 - "$out/bench_cuda_ffn.json" "$out/torch_moe_loop.jsonl" <<'EOF'
import json, sys
ours = {r["name"]: r["real_time"] for r in json.load(open(sys.argv[1]))["benchmarks"]}
print(f"{'moekit benchmark':36} {'moekit_us':>10} {'torch_us':>10} {'speedup':>8} {'torch_layer_us':>15}")
for line in open(sys.argv[2]):
    t = json.loads(line)
    for prefix, experts, whole in (("ffn_fwd/", "experts_us", "layer_us"),
                                   ("ffn_fwd_bwd/", "experts_bwd_us", "layer_bwd_us")):
        mine = next((v for k, v in ours.items() if k.startswith(prefix + t["name"] + "/")), None)
        if mine:
            print(f"{prefix + t['name']:36} {mine:10.1f} {t[experts]:10.1f} "
                  f"{t[experts] / mine:8.1f} {t[whole]:15.1f}")
EOF
  else
    echo "PyTorch with CUDA not found: comparison NOT run"
  fi
  return $status
}

case $step in
  build) build_cuda ;;
  run) run_cuda ;;
  all) build_cuda && run_cuda ;;
  *) echo "usage: $0 [build|run]" >&2; exit 2 ;;
esac
