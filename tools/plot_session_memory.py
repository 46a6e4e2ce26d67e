#!/usr/bin/env python3
"""Chart and table of the session memory protocol (examples/16_session_memory).

    plot_session_memory.py RUN_DIR/session_memory.csv [OUT.png]

The CSV has one row per (variant, scenario, category, n): the accuracy on
the corrected category's held-out texts after n corrections
(target_accuracy), the accuracy on the other categories' texts
(unrelated_accuracy) and the fraction of those whose prediction changed
(unrelated_changed), each averaged over the run's sessions. n = 0 is the
frozen model: the accuracy without session memory.

Prints a Markdown table (per scenario and variant, the mean over categories
at each n) and, given OUT.png, draws a column per scenario (a new label, a
relabel): on top the target accuracy against n per variant, below the
fraction of unrelated predictions changed. A variant with the match gate
("X + gate") takes X's colour, dashed. Exits 77 when matplotlib is missing
and a chart was asked for.
"""
import collections
import csv
import sys

SKIP = 77


def load(path):
    # (scenario, variant) -> n -> [(target, unrelated, changed) per category]
    runs = collections.defaultdict(lambda: collections.defaultdict(list))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            runs[(row["scenario"], row["variant"])][int(row["n"])].append(
                (float(row["target_accuracy"]), float(row["unrelated_accuracy"]),
                 float(row["unrelated_changed"])))
    return runs


def mean(values):
    return sum(values) / len(values)


def table(runs):
    lines = []
    for (scenario, variant), points in sorted(runs.items()):
        ns = sorted(points)
        target = " ".join(f"{n}: {mean([p[0] for p in points[n]]):.2f}" for n in ns)
        last = points[ns[-1]]
        lines.append(f"| {scenario} | {variant} | {target} | "
                     f"{mean([p[1] for p in points[ns[0]]]):.3f} -> {mean([p[1] for p in last]):.3f} | "
                     f"{mean([p[2] for p in last]):.3f} |")
    header = ("| scenario | variant | target accuracy after n corrections | "
              "unrelated accuracy, n = 0 -> last | unrelated changed at last n |\n"
              "|---|---|---|---|---|")
    return header + "\n" + "\n".join(lines)


def chart(runs, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_session_memory.py: matplotlib is missing "
              "(python3 -m pip install matplotlib)")
        sys.exit(SKIP)
    scenarios = sorted({s for s, _ in runs})
    bases = sorted({v.replace(" + gate", "") for _, v in runs})
    colours = {b: f"C{i}" for i, b in enumerate(bases)}
    fig, axes = plt.subplots(2, len(scenarios), figsize=(5.5 * len(scenarios), 8.0),
                             squeeze=False, sharex=True)
    for col, scenario in enumerate(scenarios):
        top, bottom = axes[0][col], axes[1][col]
        for (s, variant), points in sorted(runs.items()):
            if s != scenario:
                continue
            ns = sorted(points)
            style = dict(color=colours[variant.replace(" + gate", "")],
                         linestyle="--" if variant.endswith(" + gate") else "-", marker="o",
                         markersize=4, label=variant)
            top.plot(ns, [mean([p[0] for p in points[n]]) for n in ns], **style)
            bottom.plot(ns, [mean([p[2] for p in points[n]]) for n in ns], **style)
        top.set_title(scenario)
        top.set_ylabel("accuracy on the corrected category (held out)")
        top.set_ylim(0, 1.02)
        bottom.set_ylabel("other categories: predictions changed")
        bottom.set_xlabel("corrections written (n; 0 = frozen model, no memory)")
        for ax in (top, bottom):
            ax.set_xscale("symlog", linthresh=1)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv):
    if len(argv) not in (2, 3):
        print(__doc__)
        return 2
    runs = load(argv[1])
    if not runs:
        print(f"{argv[1]} has no rows")
        return 1
    print(table(runs))
    if len(argv) == 3:
        chart(runs, argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
