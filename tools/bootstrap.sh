#!/usr/bin/env bash
# Installs what moekit's build, tests, examples and benchmarks need on Debian 12
# (or Ubuntu), skipping what is already there. Shared by tools/demo.sh and
# tools/test.sh. Needs root or sudo only when something is missing.
#
# The CUDA toolkit is not installed here: where nvcc is on PATH (or at
# /usr/local/cuda/bin, see tools/env.sh), the CUDA targets are built too.
set -euo pipefail

packages=(
  g++ cmake ninja-build           # toolchain (CMake >= 3.25)
  libeigen3-dev                   # the CPU backend
  libgtest-dev libbenchmark-dev   # tests and benchmarks
  libopenblas-openmp-dev          # the optional BLAS the MoE layer benchmark compares with
  clang-format                    # the format check
  python3                         # docs snippet check
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}"
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "bootstrap: ok"
