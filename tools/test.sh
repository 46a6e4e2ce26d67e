#!/usr/bin/env bash
# Quick start, command 2: install what is missing, build everything (the CUDA
# targets too where nvcc exists) and run the whole test suite. CI runs this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/bootstrap.sh
source tools/env.sh
cmake --preset default
cmake --build --preset default
ctest --preset default -j "$(nproc)"
