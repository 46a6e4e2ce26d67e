#!/usr/bin/env python3
"""Runs tools/plot_run.py on a small synthetic metrics log (tools.plot_run).

    plot_run_fixture.py PLOT_RUN_PY OUT_DIR

Writes OUT_DIR/run.jsonl in the format of moekit::train::MetricsLog: 40 train
records (3 branches, MoE layers of 8 and 4 experts whose load drifts from
skewed to balanced, one NaN loss written as null), 5 eval records without
expert load, and a metadata line with the branches' chance levels. Then runs
PLOT_RUN_PY on it twice (chance stored, then given with --chance, into
another directory) and checks that every chart is a non-empty PNG. Exits 77
(CTest's SKIP_RETURN_CODE) when matplotlib is missing.
"""
import json
import math
import pathlib
import subprocess
import sys

SKIP = 77
PNG = b"\x89PNG\r\n\x1a\n"
CHARTS = ["losses.png", "accuracy.png", "expert_load_layer0.png", "expert_load_layer1.png"]


def load(experts, step, layer):
    """Fractions that start skewed towards expert 0 and even out."""
    skew = math.exp(-step / 120.0)
    raw = [1.0 + 3.0 * skew * (e == 0) + 0.2 * math.sin(step / 17.0 + e + layer)
           for e in range(experts)]
    total = sum(raw)
    return [r / total for r in raw]


def write_log(path):
    chance = [1 / 4, 1 / 6, 1 / 3]
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"chance": chance, "note": "metadata, not a record"}) + "\n")
        for i in range(40):
            step = 10 * (i + 1)
            task = 1.6 * math.exp(-step / 150.0) + 0.5
            aux = 1.0 + 0.3 * math.exp(-step / 80.0)
            record = {
                "split": "train", "step": step, "lr": 1e-3 * min(1.0, step / 100.0),
                "loss": task + 0.01 * aux, "task_loss": task, "aux_loss": aux, "grad_norm": 0.8,
                "accuracy": [min(0.95, c + (0.9 - c) * (1 - math.exp(-step / 100.0)))
                             for c in chance],
                "expert_load": [load(8, step, 0), load(4, step, 1)],
                "tokens_per_s": 25000.0, "peak_rss_mib": 300.0 + step / 10.0,
                "elapsed_s": step / 20.0,
            }
            if i == 7:
                record["loss"] = None  # a NaN
            f.write(json.dumps(record) + "\n")
            if step % 80 == 0:
                record = dict(record, split="eval", expert_load=[],
                              accuracy=[a - 0.03 for a in record["accuracy"]])
                f.write(json.dumps(record) + "\n")


def check(out_dir):
    for name in CHARTS:
        png = out_dir / name
        if not png.is_file() or png.stat().st_size == 0:
            print(f"plot_run.py did not write {png}")
            return False
        if png.read_bytes()[:8] != PNG:
            print(f"{png} is not a PNG")
            return False
    print(f"{out_dir}: {', '.join(CHARTS)} written")
    return True


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    script, out_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        print(f"SKIP: matplotlib is needed ({e}); install it with: "
              f"{sys.executable} -m pip install matplotlib")
        return SKIP
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CHARTS:
        (out_dir / name).unlink(missing_ok=True)
    log = out_dir / "run.jsonl"
    write_log(log)
    # Default output directory: next to the log.
    status = subprocess.run([sys.executable, str(script), str(log)]).returncode
    if status != 0:
        return status
    if not check(out_dir):
        return 1
    other = out_dir / "with_chance"
    status = subprocess.run([sys.executable, str(script), str(log), str(other),
                             "--chance", "0.25", "0.1667", "0.3333", "--title", "fixture"]).returncode
    if status != 0:
        return status
    return 0 if check(other) else 1


if __name__ == "__main__":
    sys.exit(main())
