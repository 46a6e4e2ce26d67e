#!/usr/bin/env python3
"""Writes a small Mixtral-style checkpoint with the reference safetensors
implementation, and the reference output of its MoE block, for moekit's
compatibility test (io.python_compat).

    make_mixtral_fixture.py OUT_DIR [--run PROGRAM]

OUT_DIR/mixtral.safetensors   decoder layer 1 of a Mixtral-style model:
    model.layers.1.block_sparse_moe.gate.weight            [E, d_model]  F32
    model.layers.1.block_sparse_moe.experts.{e}.w1.weight  [d_ff, d_model]
    model.layers.1.block_sparse_moe.experts.{e}.w3.weight  [d_ff, d_model]
    model.layers.1.block_sparse_moe.experts.{e}.w2.weight  [d_model, d_ff]
  all F32 except experts.5.w3.weight (F16); plus tensors the loader must
  ignore: layer 0's router (other values), an attention weight and an I64
  tensor.
OUT_DIR/mixtral_io.safetensors   x [T, d_model] and y [T, d_model] (F32), y the
  block's output computed here in float64 with NumPy, as transformers'
  MixtralSparseMoeBlock computes it: softmax over the E router logits, top-2,
  the two weights renormalised to sum 1, and y = sum_k w_k w2(silu(w1 x) * (w3 x)).

With --run, then runs PROGRAM OUT_DIR/mixtral.safetensors
OUT_DIR/mixtral_io.safetensors OUT_DIR/moekit_written.safetensors, which loads
the block into moekit, checks y, and writes the block back with moekit's
writer; this script then reads that file with the reference implementation
and checks every tensor (F32 bit for bit, the router's F16 copy against
NumPy's float16 rounding). Exits 77 (CTest's SKIP_RETURN_CODE) when the Python
modules safetensors or numpy are missing.
"""
import argparse
import pathlib
import subprocess
import sys

SKIP = 77
E, K, D_MODEL, D_FF, TOKENS, LAYER = 8, 2, 64, 128, 6, 1


def make(np, seed):
    rng = np.random.default_rng(seed)
    prefix = f"model.layers.{LAYER}.block_sparse_moe."
    gate = rng.standard_normal((E, D_MODEL)) / np.sqrt(D_MODEL)
    tensors = {prefix + "gate.weight": gate.astype(np.float32)}
    for e in range(E):
        for name, shape in (("w1", (D_FF, D_MODEL)), ("w3", (D_FF, D_MODEL)), ("w2", (D_MODEL, D_FF))):
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
            tensors[f"{prefix}experts.{e}.{name}.weight"] = w.astype(np.float32)
    tensors[prefix + "experts.5.w3.weight"] = tensors[prefix + "experts.5.w3.weight"].astype(np.float16)
    # What a loader of layer 1's block must leave alone.
    tensors["model.layers.0.block_sparse_moe.gate.weight"] = rng.standard_normal((E, D_MODEL)).astype(np.float32)
    tensors["model.layers.1.self_attn.q_proj.weight"] = rng.standard_normal((D_MODEL, D_MODEL)).astype(np.float32)
    tensors["model.position_ids"] = np.arange(TOKENS, dtype=np.int64)
    x = rng.standard_normal((TOKENS, D_MODEL)).astype(np.float32)
    return tensors, x


def reference(np, tensors, x):
    """The block's output in float64, and the smallest gap between the 2nd and
    3rd router logit of a token (routing must not hinge on rounding)."""
    prefix = f"model.layers.{LAYER}.block_sparse_moe."
    w = {k: v.astype(np.float64) for k, v in tensors.items() if k.startswith(prefix)}
    x64 = x.astype(np.float64)
    logits = x64 @ w[prefix + "gate.weight"].T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")
    rows = np.arange(TOKENS)
    gap = float(np.min(logits[rows, order[:, K - 1]] - logits[rows, order[:, K]]))
    y = np.zeros_like(x64)
    for t in range(TOKENS):
        top = order[t, :K]
        weights = p[t, top] / p[t, top].sum()
        for e, wk in zip(top, weights):
            a = w[f"{prefix}experts.{e}.w1.weight"] @ x64[t]
            g = w[f"{prefix}experts.{e}.w3.weight"] @ x64[t]
            h = a / (1.0 + np.exp(-a)) * g
            y[t] += wk * (w[f"{prefix}experts.{e}.w2.weight"] @ h)
    return y, gap


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--run", help="program to run on the files written")
    args = parser.parse_args()
    try:
        import numpy as np
        from safetensors.numpy import load_file, save_file
    except ImportError as e:
        print(f"SKIP: the Python modules safetensors and numpy are needed ({e}); "
              f"install them with: {sys.executable} -m pip install safetensors numpy")
        return SKIP

    for seed in range(2024, 2124):
        tensors, x = make(np, seed)
        y, gap = reference(np, tensors, x)
        if gap > 1e-3:
            break
    else:
        print("could not draw a fixture with well-separated routing")
        return 1

    args.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = args.out_dir / "mixtral.safetensors"
    io = args.out_dir / "mixtral_io.safetensors"
    save_file(tensors, str(ckpt), metadata={"format": "pt"})
    save_file({"x": x, "y": y.astype(np.float32)}, str(io))
    print(f"wrote {ckpt} and {io} (seed {seed}, E={E}, K={K}, d_model={D_MODEL}, d_ff={D_FF}, "
          f"T={TOKENS}, routing gap {gap:.2e})")
    if not args.run:
        return 0
    written = args.out_dir / "moekit_written.safetensors"
    status = subprocess.run([args.run, str(ckpt), str(io), str(written)]).returncode
    if status != 0:
        return status
    # moekit's writer, read back by the reference implementation.
    back = load_file(str(written))
    prefix = f"model.layers.{LAYER}.block_sparse_moe."
    expected = {k: v.astype(np.float32) for k, v in tensors.items() if k.startswith(prefix)}
    expected["check.gate_f16"] = tensors[prefix + "gate.weight"].astype(np.float16)
    if sorted(back) != sorted(expected):
        print(f"moekit wrote {sorted(back)}, expected {sorted(expected)}")
        return 1
    for name, want in expected.items():
        got = back[name]
        if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
            print(f"{name}: moekit wrote {got.dtype} {got.shape}, expected {want.dtype} {want.shape} "
                  "with the same bytes")
            return 1
    print(f"read {written} with the reference implementation: {len(back)} tensors match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
