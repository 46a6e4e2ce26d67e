#!/usr/bin/env python3
"""Runs tools/plot_session_memory.py on a small synthetic CSV (tools.plot_session_memory).

    plot_session_memory_fixture.py PLOT_PY OUT_DIR

Writes OUT_DIR/session_memory.csv in the format of examples/16_session_memory
(3 variants, one with the match gate, 2 scenarios, 2 categories, n = 0, 1, 4)
with values whose means
are known, runs PLOT_PY on it, and checks the printed table's means and that
the chart is a non-empty PNG. Exits 77 (CTest's SKIP_RETURN_CODE) when
matplotlib is missing.
"""
import pathlib
import subprocess
import sys

SKIP = 77
PNG = b"\x89PNG\r\n\x1a\n"


def write_csv(path):
    with open(path, "w", encoding="utf-8") as f:
        f.write("variant,scenario,category,n,target_accuracy,unrelated_accuracy,unrelated_changed,"
                "target_gate_open,unrelated_gate_open\n")
        for variant in ("fast weights", "slots", "fast weights + gate"):
            for scenario in ("new label", "relabel"):
                for c, category in enumerate(("business", "tech")):
                    for n in (0, 1, 4):
                        # Means over the two categories: target n / 8, unrelated 0.9 - n / 100.
                        target = n / 8 + (0.1 if c else -0.1) * (n > 0)
                        f.write(f"{variant},{scenario},{category},{n},{target},"
                                f"{0.9 - n / 100},{n / 50},1,1\n")


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    script, out_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is missing: skipped")
        return SKIP
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, png = out_dir / "session_memory.csv", out_dir / "protocol.png"
    write_csv(csv)
    png.unlink(missing_ok=True)
    run = subprocess.run([sys.executable, str(script), str(csv), str(png)],
                         capture_output=True, text=True)
    print(run.stdout, run.stderr)
    if run.returncode != 0:
        return 1
    for variant in ("slots", "fast weights + gate"):
        want = f"| relabel | {variant} | 0: 0.00 1: 0.12 4: 0.50 | 0.900 -> 0.860 | 0.080 |"
        if want not in run.stdout:
            print(f"the table lacks the row {want}")
            return 1
    if not png.is_file() or png.read_bytes()[:8] != PNG:
        print(f"{png} is not a PNG")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
