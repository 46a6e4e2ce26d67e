#!/usr/bin/env python3
"""The encoder's numbers side by side (tools/cpu_bench.sh --encoder writes the inputs):

    tools/encoder_bench_summary.py RESULTS_DIR [--cpu_time]

Reads gemm_ceilings.json (bench_gemm: fma_peak, sgemm), encoder.json
(bench_encoder) and torch_encoder.txt (bench/torch_encoder.py) and prints, per
shape, dtype and thread count: moekit's and PyTorch's milliseconds and
tokens/s, the speedup (PyTorch time / moekit time, > 1: moekit faster), and
moekit's rate as a fraction of the same run's fp32 FMA peak and OpenBLAS
SGEMM rate. With --cpu_time the PyTorch side uses its CPU-time column, as
bench_encoder --cpu_time measures the process's CPU time.
"""
import json
import sys

SHAPES = {"B32_L128": 32 * 128, "B1_L32": 32}  # tokens
DTYPES = ("fp32", "fp32_packed", "bf16", "int8")


def medians(path, cpu_time):
    """run name -> (median ms, GFLOP/s or 0) from a Google Benchmark JSON file
    (its CPU time where the runs measured the process's CPU time)."""
    out = {}
    runs = json.load(open(path))["benchmarks"]
    medians_only = any(b.get("aggregate_name") == "median" for b in runs)  # one repetition: none
    for b in runs:
        if medians_only and b.get("aggregate_name") != "median":
            continue
        name = b["run_name"]
        for suffix in ("/real_time", "/process_time"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
        out[name] = (b["cpu_time" if cpu_time else "real_time"] * scale, b.get("GFLOP/s", 0.0))
    return out


def main():
    out = sys.argv[1]
    cpu_time = "--cpu_time" in sys.argv[2:]
    gemm = medians(f"{out}/gemm_ceilings.json", cpu_time)
    enc = medians(f"{out}/encoder.json", cpu_time)
    torch = {}
    for line in open(f"{out}/torch_encoder.txt"):
        p = line.split()
        if len(p) == 6 and p[0] in SHAPES:
            torch[(p[0], p[1], int(p[2]))] = float(p[5] if cpu_time else p[3])
    print(f"{'shape':<9} {'dtype':<11} {'thr':>3} {'moekit ms':>10} {'tokens/s':>9} "
          f"{'torch ms':>9} {'tokens/s':>9} {'speedup':>8} {'GF/s':>6} {'of FMA':>7} "
          f"{'of OpenBLAS':>11}")
    for threads in (2, 1):
        peak = max(gemm.get(f"fma_peak/{p}/threads:{threads}", (0, 0))[1]
                   for p in ("avx2", "avx512"))
        blas = gemm.get(f"sgemm/openblas/threads:{threads}", (0, 0))[1]
        for shape, tokens in SHAPES.items():
            for dtype in DTYPES:
                ms, gf = enc.get(f"encoder_{dtype}/{shape}/threads:{threads}", (0.0, 0.0))
                if ms <= 0:
                    continue
                tms = torch.get((shape, dtype.removesuffix("_packed"), threads), 0.0)
                speed = f"{tms / ms:7.2f}x" if tms > 0 else f"{'-':>8}"
                ttok = f"{tokens / tms * 1e3:9.0f}" if tms > 0 else f"{'-':>9}"
                fma = f"{100 * gf / peak:6.0f}%" if peak > 0 else f"{'-':>7}"
                ob = f"{100 * gf / blas:10.0f}%" if blas > 0 else f"{'-':>11}"
                print(f"{shape:<9} {dtype:<11} {threads:>3} {ms:10.2f} {tokens / ms * 1e3:9.0f} "
                      f"{tms:9.2f} {ttok} {speed} {gf:6.1f} {fma} {ob}")
        print(f"threads {threads}: fp32 FMA peak {peak:.1f} GF/s, OpenBLAS SGEMM {blas:.1f} GF/s")
    print("speedup = PyTorch time / moekit time in the same dtype (fp32_packed against PyTorch "
          "fp32); GF/s counts the products' FLOPs (bf16 / int8 too); times are "
          + ("CPU time of each process" if cpu_time else "wall clock"))


if __name__ == "__main__":
    main()
