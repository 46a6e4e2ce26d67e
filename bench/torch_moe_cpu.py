#!/usr/bin/env python3
"""The PyTorch baseline of moekit's CPU engine benchmarks (bench_gemm,
bench_moe_layer): on the CPU, at a given thread count, in fp32 and bf16,
on the C1 (T 2048, d 1024, d_ff 4096, E 8, K 2) and C2 (d_ff 512, E 64,
K 8) SwiGLU shapes. For each it times (median of --reps runs after a
warm-up, wall clock):

  gemm_fwd    the experts' three GEMMs alone, rows spread evenly over the
              experts (x W1^T, x W3^T, h W2^T per expert): bench_gemm's
              experts_fwd
  gemm_bwd    their backward GEMMs (dW2, dh, dW1, dW3, dx): experts_bwd
  layer_fwd   a whole MoE layer forward as a plain PyTorch model writes it:
              gate GEMM, softmax, top-k, renormalise, then a loop over the
              experts (gather, SwiGLU FFN, weighted index_add): bench_moe_layer's
              layer_fwd
  layer_fwd_bwd  the same plus autograd backward from a random dy

and prints one JSON object per line: {"name", "dtype", "threads", "gemm_fwd_ms",
"gemm_bwd_ms", "layer_fwd_ms", "layer_fwd_bwd_ms", "torch"}. tools/cpu_bench.sh
runs it beside the C++ benchmarks and tabulates the ratios.

Usage: torch_moe_cpu.py [--threads N] [--reps N] [--only C1|C2] [--dtype fp32|bf16]
"""
import argparse
import json
import statistics
import time

import torch

from torch_moe_loop import expert_loop  # the same plain loop over experts as the GPU baseline

# name: (E, K, d, d_ff, T), as in bench/gemm.cpp and bench/moe_layer.cpp
SHAPES = {
    "C1": (8, 2, 1024, 4096, 2048),
    "C2": (64, 8, 1024, 512, 2048),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layer(x, w_gate, k, w1, w3, w2):
    probs = (x @ w_gate.t()).float().softmax(dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)  # renormalised, as bench_moe_layer
    return expert_loop(x, ids, weights, w1, w3, w2)


def time_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(name, shape, dtype_name, reps):
    e, k, d, f, t = shape
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)

    def param(*size, scale=0.02):
        return (torch.randn(*size, generator=g) * scale).to(dtype).requires_grad_()

    x = param(t, d, scale=1.0)
    w_gate, w1, w3, w2 = param(e, d), param(e, f, d), param(e, f, d), param(e, d, f)
    dy = torch.randn(t, d, generator=g).to(dtype)

    # The GEMMs alone, rows spread evenly: n = T K / E rows per expert.
    n = t * k // e
    xs = torch.randn(e, n, d, generator=g).to(dtype)
    hs = torch.randn(e, n, f, generator=g).to(dtype)
    dys = torch.randn(e, n, d, generator=g).to(dtype)

    def gemm_fwd():
        for i in range(e):
            a = xs[i] @ w1[i].t()
            xs[i] @ w3[i].t()
            a @ w2[i].t()

    def gemm_bwd():
        for i in range(e):
            dys[i].t() @ hs[i]  # dW2 = dy^T h
            dh = dys[i] @ w2[i]  # dh = dy W2 (stands for da and dg: same shapes)
            dh.t() @ xs[i]  # dW1 = da^T x
            dh.t() @ xs[i]  # dW3 = dg^T x
            dh @ w1[i] + dh @ w3[i]  # dx = da W1 + dg W3

    def layer_fwd_bwd():
        out = layer(x, w_gate, k, w1, w3, w2)
        out.backward(dy)

    with torch.no_grad():
        row = {
            "name": name,
            "dtype": dtype_name,
            "threads": torch.get_num_threads(),
            "gemm_fwd_ms": time_ms(gemm_fwd, reps),
        }
        row["gemm_bwd_ms"] = time_ms(gemm_bwd, reps)
        row["layer_fwd_ms"] = time_ms(lambda: layer(x, w_gate, k, w1, w3, w2), reps)
    row["layer_fwd_bwd_ms"] = time_ms(layer_fwd_bwd, reps)
    row["torch"] = torch.__version__
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default=None)
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, shape in SHAPES.items():
        if args.only and args.only != name:
            continue
        for dtype_name in DTYPES:
            if args.dtype and args.dtype != dtype_name:
                continue
            print(json.dumps(run(name, shape, dtype_name, args.reps)), flush=True)


if __name__ == "__main__":
    main()
