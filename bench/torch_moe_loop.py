#!/usr/bin/env python3
"""The baseline moekit's GPU MoE benchmarks are set beside: a plain PyTorch
MoE layer that loops over the experts (what a model without a fused MoE
library does), on the shapes of bench_cuda_ffn, in bf16 with SwiGLU experts.

For each shape it times, with CUDA events (median of --reps runs after a
warm-up):
  experts      the loop over experts alone, routing given: for each expert,
               gather its tokens, SwiGLU FFN, scale by the routing weight and
               index_add into the output (compare with bench_cuda_ffn's
               ffn_fwd, which runs the same FLOPs over the expert-major buffer)
  layer        gate GEMM + softmax + top-k + the loop (a whole MoE forward)
  *_bwd        the same plus backward (autograd) from a random dy
and prints one JSON object per line: {"name", "experts_us", "layer_us",
"experts_bwd_us", "layer_bwd_us", "device"}. tools/gpu_check.sh joins it with
bench_cuda_ffn by name (the goal: moekit >= 10x faster on the same shapes).

Usage: torch_moe_loop.py [--reps N] [--only NAME]
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

# name: (E, K, d, d_ff, T), as in bench/cuda_expert_ffn.cu
SHAPES = {
    "C1_bf16": (8, 2, 1024, 4096, 16384),
    "C2_bf16": (64, 8, 1024, 512, 16384),
    "E64_d2048_f1408_bf16": (64, 8, 2048, 1408, 4096),
    "E256_d7168_f2048_bf16": (256, 8, 7168, 2048, 4096),
}


def expert_loop(x, ids, weights, w1, w3, w2):
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        h = F.silu(xe @ w1[e].t()) * (xe @ w3[e].t())
        y.index_add_(0, tok, (h @ w2[e].t()) * weights[tok, slot, None].to(x.dtype))
    return y


def layer(x, w_gate, k, w1, w3, w2):
    probs = (x @ w_gate.t()).float().softmax(dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    return expert_loop(x, ids, weights, w1, w3, w2)


def time_us(fn, reps):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    return statistics.median(times)


def run(name, shape, reps):
    e, k, d, f, t = shape
    dev, bf16 = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def param(*size):
        return (torch.randn(*size, device=dev, generator=g) * 0.02).to(bf16).requires_grad_()

    x = torch.randn(t, d, device=dev, generator=g).to(bf16).requires_grad_()
    w_gate, w1, w3, w2 = param(e, d), param(e, f, d), param(e, f, d), param(e, d, f)
    # A balanced routing for the experts-only timing (bench_cuda_ffn's buffer is balanced).
    ids = (torch.arange(t * k, device=dev) % e).view(t, k)
    weights = torch.full((t, k), 1.0 / k, device=dev)
    dy = torch.randn(t, d, device=dev, generator=g).to(bf16)

    def backward_of(forward):
        def step():
            out = forward()
            out.backward(dy)
        return step

    experts = lambda: expert_loop(x, ids, weights, w1, w3, w2)
    whole = lambda: layer(x, w_gate, k, w1, w3, w2)
    with torch.no_grad():
        row = {"name": name, "experts_us": time_us(experts, reps), "layer_us": time_us(whole, reps)}
    row["experts_bwd_us"] = time_us(backward_of(experts), reps)
    row["layer_bwd_us"] = time_us(backward_of(whole), reps)
    row["device"] = torch.cuda.get_device_name()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    for name, shape in SHAPES.items():
        if args.only and args.only != name:
            continue
        print(json.dumps(run(name, shape, args.reps)), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
