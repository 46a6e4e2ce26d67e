#!/usr/bin/env python3
"""Charts of a training run from its moekit metrics log (JSON Lines).

    plot_run.py RUN.jsonl [OUT_DIR] [--chance P0 P1 ...] [--title TEXT]
    plot_run.py --summary SUMMARY.json [OUT_DIR]     (both may be given)

RUN.jsonl is what moekit::train::MetricsLog writes (moekit/train/metrics.hpp):
one JSON object per line with split, step, lr, loss, task_loss, aux_loss,
grad_norm, accuracy (one value per branch), expert_load (per MoE layer, the
fraction of routed assignments each expert received), tokens_per_s,
peak_rss_mib and elapsed_s. null stands for NaN and is not drawn.

Writes into OUT_DIR (default: the log's directory), as PNG:
  losses.png                 total and task loss (top) and aux loss (bottom)
                             against step: the "train" split as lines, any
                             other split ("eval", ...) as markers
  accuracy.png               per-branch accuracy against step: train as thin
                             lines, other splits as lines with markers, and a
                             dashed chance line per branch where chance levels
                             are known: --chance, or a "chance" list stored in
                             any object of the log (e.g. a metadata line)
  expert_load_layer<N>.png   one per MoE layer: a heat map of step x expert
                             (train records), colour = fraction of the layer's
                             assignments, centred on the balanced 1/E, which
                             the title and the colour bar mark

With --summary, the summary.json of the text multi-task system
(examples/17_text_multitask) adds:
  models.png                 per-branch test accuracy of every model
                             (majority class, linear head, dense FFN, MoE, fine-grained MoE)
  routing_<model>_layer<N>.png  per MoE layer of "moe" and "fine": the
                             branch x expert share of each branch's token
                             assignments (left) and the expert co-activation
                             matrix, tokens routed to both experts (right)
  early_exit.png             per branch, accuracy against the mean number of
                             encoder layers run, over the confidence
                             thresholds, for exit heads trained on labels and
                             by distillation

Draws with matplotlib's Agg backend (no display needed). Exits 77 with a
message when matplotlib is missing (install it with
`python3 -m pip install matplotlib`), 1 when the log has no records.
"""
import argparse
import collections
import json
import math
import pathlib
import sys

SKIP = 77


def number(v):
    """A JSON number, or NaN for null / missing."""
    return float(v) if isinstance(v, (int, float)) else math.nan


def read_log(path):
    records, chance = [], None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{line_no}: not JSON: {e}")
            if not isinstance(obj, dict):
                raise SystemExit(f"{path}:{line_no}: not a JSON object")
            if isinstance(obj.get("chance"), list):
                chance = [number(c) for c in obj["chance"]]
            if "step" in obj:
                records.append(obj)
    return records, chance


def series(records, key):
    xs, ys = [], []
    for r in records:
        y = number(r.get(key))
        if not math.isnan(y):
            xs.append(r["step"])
            ys.append(y)
    return xs, ys


def by_split(records):
    splits = collections.OrderedDict()
    for r in records:
        splits.setdefault(r.get("split", "train"), []).append(r)
    return splits


def plot_losses(plt, splits, out, title):
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.5),
                                      gridspec_kw={"height_ratios": [2, 1]})
    styles = {"loss": "C0", "task_loss": "C1", "aux_loss": "C2"}
    for split, recs in splits.items():
        for key, colour in styles.items():
            ax = bottom if key == "aux_loss" else top
            xs, ys = series(recs, key)
            if not xs:
                continue
            label = key.replace("_", " ") if key != "loss" else "total loss"
            if split == "train":
                ax.plot(xs, ys, color=colour, lw=1.4, label=f"{label} (train)")
            else:
                ax.plot(xs, ys, color=colour, ls="none", marker="o", ms=4,
                        label=f"{label} ({split})")
    top.set_ylabel("loss")
    bottom.set_ylabel("aux loss")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    top.set_title(f"{title}: losses" if title else "losses")
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=110)
    plt.close(fig)


def plot_accuracy(plt, splits, chance, out, title):
    fig, ax = plt.subplots(figsize=(9, 5))
    branches = max((len(r.get("accuracy") or []) for recs in splits.values() for r in recs),
                   default=0)
    for b in range(branches):
        colour = f"C{b % 10}"
        for split, recs in splits.items():
            xs, ys = [], []
            for r in recs:
                acc = r.get("accuracy") or []
                if b < len(acc) and not math.isnan(number(acc[b])):
                    xs.append(r["step"])
                    ys.append(number(acc[b]))
            if not xs:
                continue
            if split == "train":
                ax.plot(xs, ys, color=colour, lw=1.0, alpha=0.55, label=f"branch {b} (train)")
            else:
                ax.plot(xs, ys, color=colour, lw=1.6, marker="o", ms=4,
                        label=f"branch {b} ({split})")
        if chance and b < len(chance) and not math.isnan(chance[b]):
            ax.axhline(chance[b], color=colour, ls="--", lw=1, alpha=0.8)
    if chance:
        # One legend entry for the chance lines.
        ax.plot([], [], color="grey", ls="--", lw=1, label="chance")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, ncol=2 if branches > 4 else 1)
    ax.set_title(f"{title}: accuracy per branch" if title else "accuracy per branch")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)


def plot_expert_load(plt, colors, records, out, title):
    """One heat map per layer; returns the files written."""
    train = [r for r in records if r.get("split", "train") == "train"] or records
    layers = max((len(r.get("expert_load") or []) for r in train), default=0)
    written = []
    for layer in range(layers):
        rows = [(r["step"], r["expert_load"][layer]) for r in train
                if len(r.get("expert_load") or []) > layer and r["expert_load"][layer]]
        if not rows:
            continue
        # The most common expert count (a malformed record is left out).
        experts = collections.Counter(len(v) for _, v in rows).most_common(1)[0][0]
        rows = [(s, [number(f) for f in v]) for s, v in rows if len(v) == experts]
        rows.sort(key=lambda sv: sv[0])
        steps = [s for s, _ in rows]
        grid = [[v[e] for _, v in rows] for e in range(experts)]  # expert x step
        # Column edges halfway between steps.
        if len(steps) > 1:
            mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
            edges = [steps[0] - (mids[0] - steps[0])] + mids + [steps[-1] + (steps[-1] - mids[-1])]
        else:
            edges = [steps[0] - 0.5, steps[0] + 0.5]
        uniform = 1.0 / experts
        finite = [f for col in grid for f in col if not math.isnan(f)]
        top = max([2 * uniform] + finite)
        norm = colors.TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(top, uniform * 1.0001))
        fig, ax = plt.subplots(figsize=(9, 1.6 + 0.28 * experts))
        mesh = ax.pcolormesh(edges, [e - 0.5 for e in range(experts + 1)], grid,
                             cmap="coolwarm", norm=norm, shading="flat")
        bar = fig.colorbar(mesh, ax=ax, pad=0.01)
        bar.set_label("fraction of assignments")
        bar.ax.axhline(uniform, color="black", lw=1.5)
        bar.set_ticks(sorted({0.0, uniform, top}))
        bar.set_ticklabels([f"{t:.3g}" + (" = 1/E" if t == uniform else "")
                            for t in sorted({0.0, uniform, top})])
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        if experts <= 32:
            ax.set_yticks(range(experts))
        name = f"layer {layer}: expert load (E = {experts}, balanced = 1/E = {uniform:.3g})"
        ax.set_title(f"{title}: {name}" if title else name)
        fig.tight_layout()
        path = out / f"expert_load_layer{layer}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_models(plt, summary, out):
    tasks = [t["name"] for t in summary["tasks"]][:4]
    order = [m for m in ("majority", "linear", "dense", "moe", "fine") if m in summary["models"]]
    labels = {"majority": "majority class", "linear": "linear head", "dense": "dense FFN",
              "moe": "MoE E=8 K=2", "fine": "MoE E=64 K=8"}
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / max(1, len(order))
    for i, m in enumerate(order):
        acc = summary["models"][m]["test"]["accuracy"]
        xs = [t + (i - (len(order) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, acc, width, label=labels.get(m, m), color=f"C{i}")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(order))
    ax.set_title("test accuracy per branch")
    fig.tight_layout()
    path = out / "models.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_routing(plt, summary, out):
    written = []
    tasks = [t["name"] for t in summary["tasks"]][:4]
    for model in ("moe", "fine"):
        layers = summary["models"].get(model, {}).get("routing", [])
        for layer, r in enumerate(layers):
            experts = r["experts"]
            load = r["task_expert"]
            share = [[c / max(1, sum(row)) for c in row] for row in load]
            co = r["coactivation"]
            co = [co[i * experts:(i + 1) * experts] for i in range(experts)]
            fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2),
                                              gridspec_kw={"width_ratios": [1.6, 1]})
            mesh = left.imshow(share, aspect="auto", cmap="viridis")
            fig.colorbar(mesh, ax=left, pad=0.01, label="share of the branch's assignments")
            left.set_yticks(range(len(share)))
            left.set_yticklabels(tasks[:len(share)])
            left.set_xlabel("expert")
            left.set_title(f"branch x expert (max/mean load {r['max_over_mean']:.2f})")
            mesh = right.imshow(co, cmap="magma")
            fig.colorbar(mesh, ax=right, pad=0.01, label="tokens routed to both")
            right.set_xlabel("expert")
            right.set_ylabel("expert")
            right.set_title("co-activation")
            fig.suptitle(f"{model}: MoE layer {layer}, E = {experts}, K = {r['top_k']}, "
                         f"routing entropy {r['mean_token_entropy']:.2f} of {r['max_entropy']:.2f} nats")
            fig.tight_layout()
            path = out / f"routing_{model}_layer{layer}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def plot_early_exit(plt, summary, out):
    exits = summary.get("early_exit")
    if not exits:
        return []
    fig, axes = plt.subplots(1, len(exits), figsize=(4.2 * len(exits), 3.8), squeeze=False)
    for ax, (task, curves) in zip(axes[0], exits.items()):
        for kind, colour in (("labels", "C0"), ("distilled", "C1")):
            pts = sorted(curves.get(kind, []), key=lambda p: p["mean_layers"])
            ax.plot([p["mean_layers"] for p in pts], [p["accuracy"] for p in pts], marker="o",
                    ms=3, color=colour, label=f"exit heads: {kind}")
        ax.set_xlabel("mean encoder layers run")
        ax.set_ylabel("test accuracy")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("early exit: accuracy against depth over confidence thresholds")
    fig.tight_layout()
    path = out / "early_exit.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=pathlib.Path, nargs="?",
                        help="the run's JSON Lines metrics log")
    parser.add_argument("out_dir", type=pathlib.Path, nargs="?",
                        help="where to write the PNGs (default: the log's directory)")
    parser.add_argument("--summary", type=pathlib.Path,
                        help="summary.json of examples/17_text_multitask: model, routing and "
                             "early-exit charts")
    parser.add_argument("--chance", type=float, nargs="+", metavar="P",
                        help="chance accuracy per branch (e.g. 1/C_t), overriding a stored one")
    parser.add_argument("--title", default="", help="prefix of the chart titles")
    args = parser.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.colors as colors
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"SKIP: plot_run.py needs matplotlib ({e}); "
              f"install it with: {sys.executable} -m pip install matplotlib")
        return SKIP

    if args.log is None and args.summary is None:
        parser.error("give a metrics log, --summary, or both")
    source = args.log if args.log is not None else args.summary
    out = args.out_dir if args.out_dir is not None else source.resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.log is not None:
        records, stored_chance = read_log(args.log)
        if not records:
            print(f"{args.log}: no records (objects with a \"step\")")
            return 1
        chance = args.chance if args.chance else stored_chance
        splits = by_split(records)
        plot_losses(plt, splits, out, args.title)
        plot_accuracy(plt, splits, chance, out, args.title)
        written += [out / "losses.png", out / "accuracy.png"]
        written += plot_expert_load(plt, colors, records, out, args.title)
    if args.summary is not None:
        with open(args.summary, encoding="utf-8") as f:
            summary = json.load(f)
        written += plot_models(plt, summary, out)
        written += plot_routing(plt, summary, out)
        written += plot_early_exit(plt, summary, out)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
