#!/usr/bin/env python3
"""Benchmark (not a test): validate / convert throughput and peak RSS on a synthetic multi-GB NVFP4 checkpoint.

Writes a ModelOpt-NVFP4-layout checkpoint with the released 40B layer shapes (hidden 5120, intermediate 27648,
40/8 heads, vocab 76800) and random packed weights / valid FP8 scales, sharded like real exports, then times
each operation in a fresh subprocess and reports its own peak RSS (target: <= 2 GB whatever the size).

    .venv/bin/python bench/bench_checkpoint.py --layers 6 --work /tmp/bench   # ~2.5 GB checkpoint
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
import sys, time, json
sys.path.insert(0, {repo!r})
{imports}
t = time.perf_counter()
{body}
# VmHWM, not ru_maxrss: Linux carries the parent's high-water mark into ru_maxrss across fork + exec
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss_gb": hwm / 2**20}}))
"""


def make_checkpoint(out: Path, layers: int, vocab: int, shard_gb: float) -> int:
    from trtllm_loop.checkpoint.writer import write_tensors
    from trtllm_loop.config import LoopConfig

    cfg = dict(model_type="iquestloopcoder", architectures=["IQuestLoopCoderForCausalLM"], vocab_size=vocab,
               hidden_size=5120, intermediate_size=27648, num_hidden_layers=layers, num_attention_heads=40,
               num_key_value_heads=8, head_dim=128, loop_num=2, loop_window_size=64, torch_dtype="bfloat16")
    shapes = LoopConfig.from_dict(cfg).tensor_shapes()
    specs = {}
    u8, f8, f32, bf16 = torch.uint8, torch.float8_e4m3fn, torch.float32, torch.bfloat16
    for name, shape in shapes.items():
        prefix = name[:-len(".weight")]
        if name.endswith("proj.weight") and "gate_projections" not in name:
            n, k = shape
            specs[name] = (u8, (n, k // 2))
            specs[f"{prefix}.weight_scale"] = (f8, (n, k // 16))
            specs[f"{prefix}.weight_scale_2"] = (f32, ())
            specs[f"{prefix}.input_scale"] = (f32, ())
        else:
            specs[name] = (bf16, shape)
    gen = torch.Generator().manual_seed(0)

    def produce():
        for name, (dt, shape) in specs.items():
            if dt == u8:
                t = torch.randint(0, 256, shape, dtype=u8, generator=gen)
            elif dt == f8:  # positive normal FP8 values 2^-6 .. 240 (bytes 0x08 .. 0x77)
                t = torch.randint(0x08, 0x78, shape, dtype=u8, generator=gen).view(f8)
            elif dt == f32:
                t = torch.tensor(1e-4 if name.endswith("weight_scale_2") else 1e-3)
            else:  # filled in row chunks: no fp32 copy of a 786 MB embedding
                t = torch.empty(shape, dtype=bf16)
                for r in range(0, shape[0], 4096):
                    t[r:r + 4096] = (torch.randn(t[r:r + 4096].shape, generator=gen) * 0.02).to(bf16)
            yield name, t

    out.mkdir(parents=True)
    write_tensors(out, specs, produce(), max_shard_bytes=int(shard_gb * 2**30), desc="synth")
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "bench"}, "quantization": {
        "quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
        "exclude_modules": ["lm_head", "model.embed_tokens"]}}))
    return sum(math.prod(s) * d.itemsize for d, s in specs.values())


def run_child(imports: str, body: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), imports=imports, body=body)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=76800)
    p.add_argument("--shard-gb", type=float, default=1.0)
    p.add_argument("--work", default="/tmp/trtllm_loop_bench")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    src = work / "nvfp4"
    t = time.perf_counter()
    size = make_checkpoint(src, args.layers, args.vocab, args.shard_gb)
    print(f"synthetic NVFP4 checkpoint: {size / 1e9:.2f} GB, {args.layers} layers, made in "
          f"{time.perf_counter() - t:.1f} s")
    imports = "from trtllm_loop.checkpoint.validate import check; from trtllm_loop.quantize.convert import convert"
    ops = {  # timed without the imports (~3 s, ~0.3 GB RSS for torch + transformers)
        "validate": f"check({str(src)!r})",
        "convert --to fp8": f"convert({str(src)!r}, {str(work / 'fp8')!r}, 'fp8')",
        "convert --to bf16": f"convert({str(src)!r}, {str(work / 'bf16')!r}, 'bf16')",
    }
    rows = []
    for name, body in ops.items():
        r = run_child(imports, body)
        rows.append((name, r["seconds"], size / 1e9 / r["seconds"], r["peak_rss_gb"]))
        print(f"{name:<18} {r['seconds']:8.1f} s  {size / 1e9 / r['seconds']:6.3f} GB/s (source bytes)  "
              f"peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(r[3] <= 2.0 for r in rows)
    print("peak RSS target <= 2 GB:", "met" if ok else "MISSED")


if __name__ == "__main__":
    main()
