#!/usr/bin/env bash
# Runs bench_expert_parallel (bench/expert_parallel.cpp) on 1, 2 and 4 ranks
# of this machine and prints its lines, then one summary table. One OpenMP
# thread per rank; more ranks than cores oversubscribe (say so when you
# quote the numbers). The environment is the one the MPI tests use on one
# machine without a network (cmake/moekit_mpi.cmake).
#   tools/bench_expert_parallel.sh [build dir, default build/default] [bench arguments...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
build="${1:-build/default}"
shift || true
bin="$build/bench/bench_expert_parallel"
[[ -x "$bin" ]] || { echo "no $bin: build the target bench_expert_parallel first" >&2; exit 1; }
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none \
  OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_hwloc_base_binding_policy=none
echo "cores: $(nproc --all)"
json=()
for ranks in 1 2 4; do
  out="$(mpirun -np "$ranks" "$bin" "$@")"
  echo "$out" | grep -v '^{'
  json+=("$(echo "$out" | grep '^{')")
done
echo
printf '%-6s %10s %10s %13s %13s %9s %9s %12s %12s\n' ranks "step ms" "step cpu" "one proc ms" \
  "one proc cpu" "speedup" "cpu spd" "exchange ms" "bytes/token"
for j in "${json[@]}"; do
  python3 -c '
import json, sys
r = json.loads(sys.argv[1])
print("%-6d %10.3f %10.3f %13.3f %13.3f %9.2f %9.2f %12.3f %12.0f" % (r["ranks"], r["step_ms"],
      r["step_cpu_ms"], r["one_process_ms"], r["one_process_cpu_ms"],
      r["one_process_ms"] / r["step_ms"], r["one_process_cpu_ms"] / r["step_cpu_ms"],
      r["exchange_ms"], r["bytes_per_token"]))' "$j"
done
