#!/usr/bin/env bash
# moekit's CUDA backend on a GPU, in stages that each fit one device call.
#
#   tools/gpu_check.sh build    on the CPU machine (nvcc, CMake, GoogleTest,
#                               Google Benchmark): builds the CUDA tests,
#                               benchmarks and examples for sm_90 only into
#                               build/gpu and gathers what the stages need in
#                               ONE folder, build/gpu/carry (about 42 MB: the
#                               binaries, with RUNPATH $ORIGIN/lib, and lib/,
#                               the shared libraries a bare CUDA machine may
#                               lack). Take that folder along (the device
#                               tool: carry ["build/gpu/carry"]).
#   tools/gpu_check.sh stage1   on the GPU machine: the environment, every
#                               test suite in its own process, then memcheck
#                               on one small-E and one large-E instance of
#                               each suite that launches kernels.
#   tools/gpu_check.sh stage2   on the GPU machine: racecheck and synccheck on
#                               the kernels that share shared memory (the
#                               router's warp-per-token path, E > 32,
#                               included), the CUDA examples, a short
#                               benchmark table beside cuBLAS and copy
#                               bandwidth, and the plain PyTorch loop where
#                               PyTorch with CUDA is.
#   tools/gpu_check.sh dry-run [build dir]
#                               here, without a device: both stages against
#                               the binaries of a CUDA build (default
#                               build/default); every step must pass or skip
#                               cleanly (ctest: tools.gpu_check_dry_run).
#
# The stages need only the CUDA 13 runtime's driver and cuBLAS 13 on the GPU
# machine (no compiler, no CMake, no Python packages). Each writes its logs
# and summary into one folder and packs it into ONE archive:
# $OUT/gpu_check_stageN.tar.gz when OUT is set (the device tool's folder),
# else build/gpu/results/. The summary table is printed at the end as well.
# Every step runs under `timeout` and records a row of its own (ok, FAIL,
# TIMEOUT, MISSING, skipped, not run); the table is built from whatever rows
# exist, so a missing or broken result never loses the rest. Exit status: 0
# when no step failed, timed out, went missing or was cut for time, else 1.
#
# ---- device time budget (one session: 15 minutes of device time in all,
# machine start-up and idle waits included; at most 10 minutes a command) ----
# Nothing here has been timed on a GPU yet: these are estimates and limits.
#   machine start-up                        ~2-3 min (counted, outside the script)
#   stage 1, at most 450 s (MOEKIT_GPU_STAGE_SECONDS):
#     environment, device query, libraries  ~15 s
#     each test suite, own process          ~75 processes, ~1-3 min in all
#                                           (90 s limit each)
#     memcheck, small-E and large-E         ~33 processes, ~3-5 min (75 s limit each;
#                                           the batch-invariance suites draw a
#                                           smaller pool under the sanitizer)
#   stage 2, at most 450 s:
#     racecheck, then synccheck             6 groups each, ~3 min (60 s limit each)
#     examples 11 and 13                    ~10 s
#     benchmarks (C1, C2 shapes only)       ~1-2 min (90 s limit each binary)
#     PyTorch loop                          ~1 min where PyTorch is (90 s limit)
# Start-up plus both stages does not fit one session: run stage 1 in one and
# stage 2 in the next (or with MOEKIT_GPU_STAGE_SECONDS lowered). A stage
# stops starting steps when its time is spent and records the rest as "not
# run", so the order is the order of importance. When time is short, cut in
# this order: the PyTorch loop, the benchmarks beyond C1 (MOEKIT_GPU_BENCH_FILTER),
# synccheck, the large-E memcheck instances (MOEKIT_GPU_MEMCHECK=small);
# never the test suites.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${MOEKIT_GPU_BUILD:-$root/build/gpu}
carry=${MOEKIT_GPU_CARRY:-$build/carry}
stage_seconds=${MOEKIT_GPU_STAGE_SECONDS:-450}
bench_filter=${MOEKIT_GPU_BENCH_FILTER:-C1_bf16|C2_bf16|E8_K2|E64_K8|N64_R16|c1_share}
memcheck_instances=${MOEKIT_GPU_MEMCHECK:-small,large}
cuda_targets=(moekit_cuda_tests bench_cuda_routing bench_cuda_ffn bench_cuda_lora
  bench_cuda_moe_layer moekit_example_11_cuda_routing moekit_example_13_cuda_heads)
# Where each binary is in a build tree, and its name in the carry.
binaries=(tests/cuda/moekit_cuda_tests bench/bench_cuda_routing bench/bench_cuda_ffn
  bench/bench_cuda_lora bench/bench_cuda_moe_layer examples/11_cuda_routing
  examples/13_cuda_heads)

# ---- build (CPU machine) --------------------------------------------------------

build_carry() {
  set -e
  # shellcheck source=tools/env.sh
  source "$root/tools/env.sh"
  # RUNPATH (new dtags) $ORIGIN/lib: the binaries find the carried libraries
  # wherever the folder lands, and LD_LIBRARY_PATH still comes first.
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEKIT_WERROR=ON \
    -DMOEKIT_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 '-DCMAKE_BUILD_RPATH=$ORIGIN/lib' \
    -DCMAKE_EXE_LINKER_FLAGS=-Wl,--enable-new-dtags >/dev/null
  nice -n 10 cmake --build "$build" -j "${MOEKIT_GPU_BUILD_JOBS:-2}" --target "${cuda_targets[@]}"
  rm -rf "$carry" && mkdir -p "$carry/lib"
  local b
  for b in "${binaries[@]}"; do cp "$build/$b" "$carry/"; done
  # Every library the loader resolves outside glibc and CUDA (the GPU
  # machine has its own driver and cuBLAS): GoogleTest, Google Benchmark,
  # OpenMP, and this compiler's C++ runtime, newer than some distributions'.
  for b in "${binaries[@]}"; do ldd "$carry/${b##*/}"; done |
    awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' |
    grep -Ev '^(libc|libm|libdl|librt|libpthread|ld-linux[^ ]*|libcuda|libcublas[^ ]*|libcudart)\.so' |
    awk '{print $2}' | sort -u | xargs -r cp -L -t "$carry/lib/"
  # The stages need nothing else but this script and bench/torch_moe_loop.py,
  # which travel with the working tree.
  for b in "${binaries[@]}"; do
    readelf -d "$carry/${b##*/}" | grep -q 'RUNPATH.*\$ORIGIN/lib' ||
      { echo "no RUNPATH \$ORIGIN/lib in ${b##*/}" >&2; exit 1; }
  done
  du -sh "$carry"
  ls "$carry" "$carry/lib"
}

# ---- the steps of a stage ---------------------------------------------------------

self=$root/tools/gpu_check.sh
dir=${MOEKIT_GPU_CHECK_DIR:-}  # this stage's result folder (exported for the steps)
deadline=0                     # epoch seconds after which no step starts
device=0                       # 1 where the test binary ran a kernel
failures=0

# row NAME STATUS RC SECONDS NOTE: one line of the summary.
row() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$dir/summary.tsv"; }

# step NAME LIMIT COMMAND...: runs COMMAND under `timeout` (at most LIMIT
# seconds, and never past the stage's deadline) into NAME.txt and records its
# row: ok, FAIL, TIMEOUT, skipped (exit 77, or the binary said it had no
# device) or not run (the stage's time is spent). A COMMAND that is one of
# this script's functions runs as `gpu_check.sh call FUNCTION ...`, since
# `timeout` runs programs only.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - $(date +%s)))
  if ((left < 5)); then
    row "$name" "not run" - 0 "stage time spent"
    failures=$((failures + 1))
    return 0
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS rc=0
  [[ $(type -t "$1") == function ]] && set -- "$self" call "$@"
  timeout -k 5 "$limit" "$@" >"$dir/$name.txt" 2>&1 || rc=$?
  local seconds=$((SECONDS - start)) status note
  note=$(summarise "$dir/$name.txt")
  case $rc in
    0) status=ok ;;
    77) status=skipped ;;
    124 | 137) status=TIMEOUT note="after ${limit} s; $note" ;;
    *) status=FAIL ;;
  esac
  if [[ $status == ok ]] && grep -qE '^no CUDA device|^\[  SKIPPED \] [1-9]' "$dir/$name.txt" &&
    ! grep -qE '^\[  PASSED  \] [1-9]' "$dir/$name.txt"; then
    status=skipped
  fi
  [[ $status == FAIL || $status == TIMEOUT ]] && failures=$((failures + 1))
  row "$name" "$status" "$rc" "$seconds" "$note"
}

# A one-line note from a step's log: the test counts, the sanitizer's error
# summary, or the last line.
summarise() {
  local log=$1 passed failed skipped sanitizer
  passed=$(grep -oE '^\[  PASSED  \] [0-9]+' "$log" | grep -oE '[0-9]+$' | tail -n 1)
  failed=$(grep -cE '^\[  FAILED  \] [A-Za-z]' "$log")
  skipped=$(grep -oE '^\[  SKIPPED \] [0-9]+ test' "$log" | grep -oE '[0-9]+' | tail -n 1)
  sanitizer=$(grep -oE 'ERROR SUMMARY: [0-9]+ errors?' "$log" | tail -n 1)
  if [[ -n $passed$skipped || $failed != 0 ]]; then
    echo "${passed:-0} passed, $failed failed, ${skipped:-0} skipped${sanitizer:+; $sanitizer}"
  elif [[ -n $sanitizer ]]; then
    echo "$sanitizer"
  else
    tail -n 1 "$log" | tr '\t' ' ' | cut -c1-100
  fi
}

# The loader's view of the carried binaries, and a fallback library path for
# what it cannot find (cuBLAS 13 installed off the default path, or by pip).
find_libraries() {
  local missing
  missing=$(for b in "$carry"/moekit_cuda_tests "$carry"/bench_cuda_* "$carry"/1[13]_cuda_*; do
    ldd "$b" 2>&1 | awk '/not found/ {print $1}'
  done | sort -u)
  [[ -z $missing ]] && { echo "every library found"; return 0; }
  echo "not found: $missing"
  local lib hit extra=""
  for lib in $missing; do
    hit=$(timeout 20 find /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/lib64 \
      /usr/lib/x86_64-linux-gnu /opt /usr/local/lib/python3*/*-packages/nvidia \
      "$HOME"/.local/lib/python3*/site-packages/nvidia -maxdepth 4 -name "$lib*" 2>/dev/null |
      head -n 1)
    [[ -n $hit ]] && extra="$extra:${hit%/*}"
    echo "$lib: ${hit:-nowhere}"
  done
  [[ -n $extra ]] && echo "fallback LD_LIBRARY_PATH:${extra#:}" >"$dir/.fallback"
  return 0
}

# Puts the fallback library path (find_libraries) in front, where there is one.
use_fallback() {
  if [[ -f $dir/.fallback ]]; then
    LD_LIBRARY_PATH="$(sed 's/^fallback LD_LIBRARY_PATH://' "$dir/.fallback")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
  fi
}

environment() {
  echo "== host: $(uname -srm)"
  echo "== nvidia-smi -L"
  nvidia-smi -L 2>&1 || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 || true
  echo "== compute-sanitizer --version"
  compute-sanitizer --version 2>&1 || echo "compute-sanitizer not found"
  echo "== python3 / torch"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 |
    tail -n 1 || true
  echo "== carry"
  ls -l "$carry" "$carry/lib" 2>&1
  echo "== libraries"
  find_libraries
}

# Whether a kernel can run here: the test binary's own device query.
device_usable() {
  [[ -x $carry/moekit_cuda_tests ]] &&
    timeout 60 "$carry/moekit_cuda_tests" --gtest_filter=CudaView.StridedViewInKernel 2>&1 |
    grep -q '^\[  PASSED  \] 1 test'
}

# The test binary's suites, one per line: NAME<TAB>E (E of a MoeSpec type
# parameter, empty for other suites).
list_suites() {
  "$carry/moekit_cuda_tests" --gtest_list_tests 2>/dev/null |
    awk '/^[^ ]/ && $1 ~ /\.$/ {
      name = $1; sub(/\.$/, "", name)
      e = ""
      if (match($0, /MoeSpec<[0-9]+/)) e = substr($0, RSTART + 8, RLENGTH - 8)
      print name "\t" e
    }'
}

# Suites that launch no kernel (argument checks, host maths): no sanitizer runs.
host_only() { [[ $1 =~ (Host|HostMath|Args|BadInput|BadArguments|TestSupport)$ ]]; }

# The typed suites' smallest-E and largest-E instances (first and last for
# other type parameters), and every other suite that launches kernels.
memcheck_suites() {
  list_suites | awk -F'\t' -v which="$memcheck_instances" '
    { base = $1; sub(/\/[0-9]+$/, "", base) }
    base == $1 { plain[++n] = $1; next }
    {
      e = ($2 == "") ? 0 : $2 + 0
      if (!(base in lo)) { order[++m] = base; lo[base] = $1; hi[base] = $1; le[base] = e; he[base] = e }
      if (e < le[base]) { lo[base] = $1; le[base] = e }
      if (e >= he[base]) { hi[base] = $1; he[base] = e }
    }
    END {
      for (i = 1; i <= n; i++) print plain[i]
      for (i = 1; i <= m; i++) {
        b = order[i]
        if (which ~ /small/) print lo[b]
        if (which ~ /large/ && hi[b] != lo[b]) print hi[b]
      }
    }'
}

# sanitizer_step NAME LIMIT TOOL FILTER: the tests FILTER under the
# sanitizer's TOOL, or a row saying why not: skipped without a device,
# MISSING (a failure) on a GPU machine without compute-sanitizer.
sanitizer_step() {
  if ((device == 0)); then
    row "$1" skipped - 0 "no usable CUDA device"
  elif ! command -v compute-sanitizer >/dev/null; then
    row "$1" MISSING - 0 "compute-sanitizer not found"
    failures=$((failures + 1))
  else
    step "$1" "$2" sanitize "$3" "$4"
  fi
}

sanitize() {
  local tool=$1 filter=$2
  MOEKIT_UNDER_COMPUTE_SANITIZER=1 compute-sanitizer --tool "$tool" --error-exitcode 99 \
    --print-limit 20 "$carry/moekit_cuda_tests" --gtest_brief=1 --gtest_filter="$filter"
}

# A typed suite's instances for racecheck / synccheck, as a gtest filter: the
# largest E of the router's thread-per-token path (E <= 32) and the smallest
# of its warp-per-token path (E > 32), where the shared rows are scratch.
either_side_of_32() {
  list_suites | awk -F'\t' -v suite="$1" '
    { base = $1; sub(/\/[0-9]+$/, "", base) }
    base == suite && $2 != "" {
      if ($2 <= 32 && $2 + 0 >= te) { t = $1; te = $2 + 0 }
      if ($2 > 32 && (w == "" || $2 + 0 < we)) { w = $1; we = $2 + 0 }
    }
    END { printf "%s.*:%s.*", t, w }'
}

stage1() {
  step environment 60 environment
  use_fallback
  local suite
  device=1
  device_usable || device=0
  echo "device usable: $device" >>"$dir/environment.txt"
  # Every suite in its own process: a crash or a hang costs one suite.
  while IFS=$'\t' read -r suite _; do
    step "test.${suite//\//_}" 90 "$carry/moekit_cuda_tests" --gtest_brief=1 \
      --gtest_filter="$suite.*"
  done < <(list_suites)
  [[ -x $carry/moekit_cuda_tests ]] || row tests FAIL - 0 "no moekit_cuda_tests in $carry"
  while read -r suite; do
    host_only "${suite%%/*}" || sanitizer_step "memcheck.${suite//\//_}" 75 memcheck "$suite.*"
  done < <(memcheck_suites)
}

stage2() {
  find_libraries >"$dir/libraries.txt"
  use_fallback
  device=1
  device_usable || device=0
  # The kernels that share shared memory, the router's warp path first.
  local -a groups=(
    "router:$(either_side_of_32 CudaRouter):$(either_side_of_32 CudaAuxLosses)"
    "dispatch:$(either_side_of_32 CudaDispatchPlan):CudaDispatchRows*:CudaDispatchPlanRerun.*"
    "lora:CudaLora.*"
    "heads:GpuTaskHeads.*:GpuDistillation.*:GpuEarlyExit.*:GpuMultiExitLoss.*"
    "moe_layer:CudaMoeLayer.*"
  )
  local tool group
  for tool in racecheck synccheck; do
    for group in "${groups[@]}"; do
      sanitizer_step "$tool.${group%%:*}" 60 "$tool" "${group#*:}"
    done
  done
  local example bench
  for example in 11_cuda_routing 13_cuda_heads; do
    step "example.$example" 60 "$carry/$example"
  done
  # --benchmark_min_time in plain seconds: Google Benchmark 1.7 (whose shared
  # library the carry holds) rejects a "0.05s" suffix.
  for bench in bench_cuda_routing bench_cuda_ffn bench_cuda_lora bench_cuda_moe_layer; do
    step "$bench" 90 "$carry/$bench" --benchmark_filter="$bench_filter" \
      --benchmark_min_time=0.05 --benchmark_color=false \
      --benchmark_out="$dir/$bench.json" --benchmark_out_format=json
  done
  if ((device == 1)) && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    step torch_moe_loop 90 sh -c "python3 '$root/bench/torch_moe_loop.py' >'$dir/torch_moe_loop.jsonl'"
  else
    row torch_moe_loop skipped - 0 "no PyTorch with CUDA"
  fi
  bench_table >"$dir/bench_table.txt" 2>&1
}

# The benchmarks beside their ceilings, from whichever JSON files exist and
# parse; each file on its own, so one broken file loses only its own rows.
bench_table() {
  if ! command -v python3 >/dev/null; then
    echo "no python3: the benchmark table is in bench_cuda_*.txt"
    return 0
  fi
  python3 - "$dir" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
cols = ["GB/s", "copy_GB/s", "of_copy", "TFLOP/s", "dense_TFLOP/s", "of_dense", "routing_us",
        "gemm_us", "share", "group_us", "mem_GiB"]
print(f"{'benchmark':44} {'time_us':>9} " + " ".join(f"{c:>13}" for c in cols))
ffn = {}
for path in sorted(glob.glob(os.path.join(out, "bench_cuda_*.json"))):
    try:
        runs = json.load(open(path))["benchmarks"]
    except (OSError, ValueError, KeyError) as e:
        print(f"{os.path.basename(path)}: unreadable ({e.__class__.__name__})")
        continue
    for r in runs:
        if r.get("error_occurred"):
            print(f"{r.get('name', '?'):44} skipped: {r.get('error_message', '')}")
            continue
        cells = [f"{r[c]:13.3g}" if isinstance(r.get(c), (int, float)) else f"{'':13}" for c in cols]
        print(f"{r.get('name', '?'):44} {r.get('real_time', float('nan')):9.1f} " + " ".join(cells))
        if "bench_cuda_ffn" in path:
            ffn[r.get("name", "")] = r.get("real_time")
torch = os.path.join(out, "torch_moe_loop.jsonl")
if os.path.exists(torch):
    print(f"\n{'moekit benchmark':36} {'moekit_us':>10} {'torch_us':>10} {'speedup':>8}")
    for line in open(torch):
        try:
            t = json.loads(line)
        except ValueError:
            continue
        for prefix, key in (("ffn_fwd/", "experts_us"), ("ffn_fwd_bwd/", "experts_bwd_us")):
            mine = next((v for k, v in ffn.items() if k.startswith(prefix + t.get("name", "") + "/")), None)
            if mine and key in t:
                print(f"{prefix + t['name']:36} {mine:10.1f} {t[key]:10.1f} {t[key] / mine:8.1f}")
EOF
}

# run_stage N: the stage into its folder, packed into one archive; the table
# printed whatever happened inside.
run_stage() {
  local n=$1 results
  if [[ -n ${OUT:-} ]]; then
    results=$(mktemp -d)  # only the archive goes to $OUT
  else
    results=$build/results
  fi
  dir=$results/gpu_check_stage$n
  export MOEKIT_GPU_CHECK_DIR=$dir
  rm -rf "$dir" && mkdir -p "$dir"
  : >"$dir/summary.tsv"
  deadline=$(($(date +%s) + stage_seconds))
  "stage$n"
  rm -f "$dir/.fallback"
  {
    printf '%-44s %-8s %4s %5s  %s\n' step status rc sec note
    awk -F'\t' '{printf "%-44s %-8s %4s %5s  %s\n", $1, $2, $3, $4, $5}' "$dir/summary.tsv"
    awk -F'\t' '{n[$2]++} END {printf "\n%d steps:", NR; for (s in n) printf " %d %s", n[s], s; print ""}' \
      "$dir/summary.tsv"
  } >"$dir/summary.txt"
  cat "$dir/summary.txt"
  [[ -f $dir/bench_table.txt ]] && cat "$dir/bench_table.txt"
  local archive=${OUT:-$results}/gpu_check_stage$n.tar.gz
  tar -czf "$archive" -C "$results" "gpu_check_stage$n"
  [[ -n ${OUT:-} ]] && rm -rf "$results"
  echo "results: $archive"
  ((failures == 0))
}

# ---- dry run (no device) ------------------------------------------------------------

dry_run() {
  local tree=${1:-$root/build/default}
  if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "a GPU is present: run the stages for real instead"
    exit 77
  fi
  local b status=0
  scratch=$(mktemp -d)  # global: the EXIT trap outlives this function
  trap 'rm -rf "$scratch"' EXIT
  mkdir -p "$scratch/carry" "$scratch/out"
  for b in "${binaries[@]}"; do
    [[ -x $tree/$b ]] || { echo "missing $tree/$b: build the CUDA targets first"; exit 1; }
    ln -s "$tree/$b" "$scratch/carry/${b##*/}"
  done
  for n in 1 2; do
    MOEKIT_GPU_CARRY=$scratch/carry OUT=$scratch/out MOEKIT_GPU_STAGE_SECONDS=${MOEKIT_GPU_STAGE_SECONDS:-300} \
      "$root/tools/gpu_check.sh" "stage$n" || status=1
    local summary
    summary=$(tar -xzOf "$scratch/out/gpu_check_stage$n.tar.gz" "gpu_check_stage$n/summary.tsv") ||
      { echo "stage $n: no summary in its archive"; exit 1; }
    # Without a device every step must pass (the host tests) or skip; none
    # may fail, time out or be cut for time; the device steps must be there.
    if awk -F'\t' '$2 != "ok" && $2 != "skipped"' <<<"$summary" | grep -q .; then
      echo "stage $n: a step neither passed nor skipped"
      status=1
    fi
    local expect=memcheck
    [[ $n == 2 ]] && expect=racecheck
    if ! grep -qE "^$expect\.[^[:space:]]+[[:space:]]skipped" <<<"$summary"; then
      echo "stage $n: no skipped $expect rows"
      status=1
    fi
    if [[ $n == 1 ]] && ! grep -qE '^test\.[^[:space:]]+[[:space:]]ok' <<<"$summary"; then
      echo "stage 1: no test suite ran"
      status=1
    fi
  done
  [[ $(ls "$scratch/out") == $'gpu_check_stage1.tar.gz\ngpu_check_stage2.tar.gz' ]] ||
    { echo "the stages left more than their two archives: $(ls "$scratch/out")"; status=1; }
  return $status
}

case ${1:-} in
  call)
    shift
    "$@"
    ;;
  build) build_carry ;;
  stage1) run_stage 1 ;;
  stage2) run_stage 2 ;;
  dry-run) dry_run "${2:-}" ;;
  *)
    echo "usage: $0 build | stage1 | stage2 | dry-run [build dir]" >&2
    exit 2
    ;;
esac
