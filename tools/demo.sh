#!/usr/bin/env bash
# Quick start, command 1: install what is missing, build and run the demo
# (examples/01_quickstart).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/bootstrap.sh
source tools/env.sh
cmake --preset demo >/dev/null
cmake --build --preset demo --target moekit_example_01_quickstart
./build/demo/examples/01_quickstart
