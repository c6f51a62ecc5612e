#!/usr/bin/env python3
"""Benchmark (not a test): peak RSS and seconds per layer of ``quantize --mode streamed`` on a synthetic BF16
Loop model whose source is at least 3x the streamed path's RSS bound (``trtllm_loop.quantize.stream.rss_bound``).

The source uses the ``synth`` package's weight statistics (``random_weights``), generated one layer at a time so
the generator itself stays small. The quantize run is a fresh subprocess that reports its own VmHWM.

    .venv/bin/python bench/bench_quantize.py --work /tmp/bench-q            # ~3.8 GB source, ~20 min on 2 cores
    .venv/bin/python bench/bench_quantize.py --layers 8 --hidden 1024       # quicker, smaller
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
import torch
from trtllm_loop.quantize.pipeline import quantize
t = time.perf_counter()
rep = quantize({src!r}, {out!r}, {qformat!r}, "fp8", {calib!r}, num_samples={n}, seq_len={t}, mode="streamed")
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss_bytes": hwm * 1024, "mode": rep["mode"]}}))
"""


def config(layers: int, hidden: int, vocab: int):
    from trtllm_loop.config import LoopConfig
    heads = hidden // 128
    return LoopConfig.from_dict(dict(
        model_type="iquestloopcoder", architectures=["IQuestLoopCoderForCausalLM"], vocab_size=vocab,
        hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=128, loop_window_size=64,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, loop_num=2, bos_token_id=1,
        eos_token_id=2, max_position_embeddings=8192, torch_dtype="bfloat16"), source="bench")


def make_source(out: Path, cfg, shard_gb: float = 2.0) -> int:
    from trtllm_loop.checkpoint.writer import write_tensors
    from trtllm_loop.synth import random_weights
    one = config(1, cfg.hidden_size, cfg.vocab_size)
    shapes = cfg.tensor_shapes()
    specs = {n: (torch.bfloat16, tuple(s)) for n, s in shapes.items()}

    def produce():
        cur, sd = None, {}
        for name in specs:
            parts = name.split(".")
            l = int(parts[2]) if parts[1] in ("layers", "gate_projections") else 0
            if l != cur:
                cur, sd = l, random_weights(one, seed=l, dtype=torch.bfloat16)
            yield name, sd[".".join(parts[:2] + ["0"] + parts[3:]) if parts[1] in ("layers", "gate_projections")
                           else name]

    out.mkdir(parents=True)
    write_tensors(out, specs, produce(), max_shard_bytes=int(shard_gb * 2**30), desc="synth")
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return sum(math.prod(s) * d.itemsize for d, s in specs.values())


def main() -> None:
    from trtllm_loop.quantize.stream import rss_bound
    from trtllm_loop.synth import preset_config
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench-quantize")
    p.add_argument("--layers", type=int, default=44)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--qformat", default="nvfp4")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "quantize_streamed.json"))
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    cfg = config(a.layers, a.hidden, a.vocab)
    t0 = time.perf_counter()
    src_bytes = make_source(work / "src", cfg)
    synth_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": torch.randint(3, a.vocab, (a.seq_len,), generator=g).tolist()})
                             + "\n" for _ in range(a.samples)))
    bound = rss_bound(cfg, torch.bfloat16, a.seq_len)
    code = CHILD.format(repo=str(REPO), src=str(work / "src"), out=str(work / "out"), qformat=a.qformat,
                        calib=str(calib), n=a.samples, t=a.seq_len)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    m = json.loads(r.stdout.strip().splitlines()[-1])
    res = {"layers": a.layers, "hidden": a.hidden, "intermediate": cfg.intermediate_size, "vocab": a.vocab,
           "qformat": a.qformat, "kv_cache": "fp8", "samples": a.samples, "seq_len": a.seq_len,
           "source_gb": src_bytes / 2**30, "rss_bound_gb": bound / 2**30, "source_over_bound": src_bytes / bound,
           "peak_rss_gb": m["peak_rss_bytes"] / 2**30, "under_bound": m["peak_rss_bytes"] <= bound,
           "seconds": m["seconds"], "seconds_per_layer": m["seconds"] / a.layers, "synth_seconds": synth_s,
           "cpu_threads": torch.get_num_threads(),
           # the same bound for the released 40B shape at 512 tokens per sample (what a 24 GB machine must hold)
           "rss_bound_40b_gb": rss_bound(preset_config("40b-shape", "bfloat16"), torch.bfloat16, 512) / 2**30}
    for k, v in res.items():
        print(f"{k:>20}: {v:.3f}" if isinstance(v, float) else f"{k:>20}: {v}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", a.out)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
