"""CPU throughput and peak memory of the reference runtimes (a benchmark, not a test).

For the tiny and small presets, in each mode:
  prefill  full-sequence forward of the reference model (tokens/s of prompt processing)
  decode   token-by-token decode through the HF LoopCache (tokens/s, batch 1)
  paged    paged runtime emulator, batch of --batch sequences decoding together (tokens/s summed)
Each measurement runs in its own process so that its peak RSS is its own.

usage: python bench/bench_runtime.py [--presets tiny,small] [--tokens 64] [--batch 4] [--dtype float32]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(ckpt: str, mode: str, tokens: int, batch: int, dtype: str) -> dict:
    import torch

    from trtllm_loop.modeling.load import load_model
    from trtllm_loop.runtime import LoopRuntime, SamplingParams

    torch.manual_seed(0)
    model = load_model(ckpt, dtype)
    V = model.model.loop_config.vocab_size
    prompt = torch.randint(3, V, (32,)).tolist()
    with torch.no_grad():
        t0 = time.perf_counter()
        if mode == "prefill":
            ids = torch.randint(3, V, (1, tokens * 4))
            model(ids)
            n = ids.numel()
        elif mode == "decode":
            out = model(torch.tensor([prompt]))
            cache, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            t0 = time.perf_counter()
            for _ in range(tokens):
                o = model(torch.tensor([[tok]]), past_key_values=cache)
                cache, tok = o.past_key_values, int(o.logits[0, -1].argmax())
            n = tokens
        else:
            rt = LoopRuntime(model, tokens_per_block=16, max_batch_size=batch)
            outs = rt.generate([prompt] * batch, SamplingParams(max_tokens=tokens, ignore_eos=True))
            n = sum(len(o) for o in outs)
        dt = time.perf_counter() - t0
    return {"mode": mode, "tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._one:
        print(json.dumps(measure(a._one[0], a._one[1], a.tokens, a.batch, a.dtype)))
        return
    from trtllm_loop.synth import synthesize

    work = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    print(f"{'preset':8} {'mode':8} {'tokens':>7} {'tok/s':>9} {'peak RSS':>10}")
    for preset in a.presets.split(","):
        ckpt = synthesize(work / preset, preset, dtype=a.dtype, tokenizer=False)
        for mode in ("prefill", "decode", "paged"):
            r = subprocess.run([sys.executable, __file__, "--_one", str(ckpt), mode, "--tokens", str(a.tokens),
                                "--batch", str(a.batch), "--dtype", a.dtype], capture_output=True, text=True)
            if r.returncode:
                print(r.stderr, file=sys.stderr)
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{preset:8} {mode:8} {m['tokens']:>7} {m['tokens_per_s']:>9.1f} {m['peak_rss_mb']:>8.1f}MB")


if __name__ == "__main__":
    main()
