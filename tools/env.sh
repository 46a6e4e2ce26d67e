# Sourced by tools/demo.sh and tools/test.sh: the environment both run in.
# nvcc may be installed off PATH; CMake finds it through PATH or CUDACXX.
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
# OpenMP workers sleep instead of spinning when idle, so they never fight
# another runtime's threads for the cores (docs/index.md#threads).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
