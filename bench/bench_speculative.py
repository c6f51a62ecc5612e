#!/usr/bin/env python
"""Speculative decoding speed-up in the paged runtime (a benchmark, not a test): the `small` synth preset
(4 layers x 2 passes, W = 64) decoding a repetitive code prompt greedily, with

  baseline         one token per step
  ngram:K          prompt lookup, K = 2, 4, 8
  draft:K          a `tiny`-shape draft with the target's vocabulary (random weights: an unrelated model)
  layerskip:K      the target's first layer only (same embeddings / head: a correlated draft)
  self:K           the target as its own draft (every draft accepted: the ceiling of tokens per step)

For each: accepted drafts per verification step, tokens per step, wall-clock tokens/s of the generation and
the speed-up over baseline; the greedy output is checked to be identical to the baseline's (it must be).
CPU wall clock of random models: the relative figures are what matters (a GPU is bandwidth-bound per step,
so there tokens/step is the ceiling of the speed-up).

usage: python bench/bench_speculative.py [--out bench/results/speculative_cpu] [--tokens 64] [--repeats 1]
Writes OUT.json, OUT.md and OUT.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

CODE = '''def parse_config(path):
    with open(path) as f:
        data = json.load(f)
    if "name" not in data:
        raise ValueError("missing name")
    return data


def parse_settings(path):
    with open(path) as f:
        data = json.load(f)
    if "name" not in data:
        raise ValueError("missing name")
    return data


def parse_'''


def write_draft(target_dir: Path, out: Path, kind: str) -> Path:
    import torch
    from safetensors.torch import save_file

    from trtllm_loop.checkpoint import load_checkpoint
    from trtllm_loop.config import LoopConfig
    from trtllm_loop.synth import preset_config, random_weights

    tcfg = LoopConfig.from_file(target_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "tiny":
        cfg = replace(preset_config("tiny", "float32"), vocab_size=tcfg.vocab_size)
        sd = random_weights(cfg, 7, torch.float32)
    else:  # layer skip: keep layer 0 of the target
        cfg = replace(tcfg, num_hidden_layers=1)
        sd = {k: v for k, v in load_checkpoint(target_dir, torch.float32).state_dict.items()
              if not (k.startswith(("model.layers.", "model.gate_projections.")) and k.split(".")[2] != "0")}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    return out


def run(model, prompt, n, make=None, repeats=1):
    """Best wall clock of ``repeats`` runs (the machine is shared); counts from the last."""
    from trtllm_loop.runtime import LoopRuntime, SamplingParams

    wall = float("inf")
    for _ in range(repeats):
        rt = LoopRuntime(model, tokens_per_block=16, max_batch_size=1, max_seq_len=len(prompt) + n + 1,
                         speculative=make() if make else None)
        t0 = time.perf_counter()
        [out] = rt.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))
        wall = min(wall, time.perf_counter() - t0)
    st = rt.spec_stats
    return out, {"wall_s": wall, "tok_s": n / wall, "steps": rt.steps,
                 "tokens_per_step": n / rt.steps,
                 "accepted_per_verification": st["accepted"] / st["steps"] if st["steps"] else 0.0,
                 "acceptance_rate": st["accepted"] / st["proposed"] if st["proposed"] else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/speculative_cpu")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="runs per config; the best wall clock is kept")
    ap.add_argument("--draft-ks", default="4", help="K values of the model drafts (comma-separated)")
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    from trtllm_loop.modeling.load import load_model
    from trtllm_loop.runtime.speculative import DraftProposer, NgramProposer
    from trtllm_loop.synth import synthesize

    torch.manual_seed(0)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        target = synthesize(d / "small", "small", seed=0, dtype="float32")
        tok = AutoTokenizer.from_pretrained(str(target))
        prompt = tok.encode(CODE, add_special_tokens=False)
        model = load_model(target, "float32")
        drafts = {"draft": load_model(write_draft(target, d / "tiny", "tiny"), "float32"),
                  "layerskip": load_model(write_draft(target, d / "skip", "skip"), "float32"), "self": model}
        n = args.tokens
        run(model, prompt, 8, repeats=1)  # warm-up
        ref, base = run(model, prompt, n, repeats=args.repeats)
        rows = {"baseline": base}
        configs = [(f"ngram:{k}", lambda k=k: NgramProposer(k)) for k in (2, 4, 8)]
        configs += [(f"{name}:{k}", lambda name=name, k=k: DraftProposer(drafts[name], k, tokens_per_block=16,
                                                                         max_batch_size=1, max_seq_len=len(prompt) + n + 1))
                    for name in ("draft", "layerskip", "self") for k in map(int, args.draft_ks.split(","))]
        for name, make in configs:
            out, r = run(model, prompt, n, make, args.repeats)
            if out != ref:
                print(f"{name}: output differs from normal greedy decoding", file=sys.stderr)
                return 1
            r["speedup"] = r["tok_s"] / base["tok_s"]
            rows[name] = r
            print(f"{name:12s} {r['tok_s']:7.1f} tok/s  x{r['speedup']:.2f}  {r['tokens_per_step']:.2f} tok/step  "
                  f"accept {r['acceptance_rate']:.0%}", flush=True)
    rows["baseline"]["speedup"] = 1.0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "synth small (4 layers x 2 passes, hidden 256, W 64), float32, CPU 2 threads",
            "prompt_tokens": len(prompt), "output_tokens": n, "greedy_identical": True, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    lines = [f"# Speculative decoding, paged runtime, {meta['model']}",
             f"prompt {len(prompt)} tokens (repetitive code), {n} greedy output tokens; every row's output is "
             f"identical to the baseline's. Tokens/step and acceptance are exact; tok/s is the best of {args.repeats} "
             "run(s) on a 2-core machine shared with other jobs (noisy). Random weights rarely repeat their prompt, so prompt "
             "lookup finds few drafts and unrelated drafts are rejected; `self` shows the ceiling (all accepted).",
             "",
             "| config | tok/s | speed-up | tokens/step | accepted/verification | acceptance |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {r['tokens_per_step']:.2f} | "
                     f"{r['accepted_per_verification']:.2f} | {r['acceptance_rate']:.0%} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.bar(names, [rows[k]["tokens_per_step"] for k in names], color="tab:blue")
    a1.set_ylabel("tokens per step (weight streams)")
    a1.set_title("tokens per target step")
    a2.bar(names, [rows[k]["speedup"] for k in names], color="tab:green")
    a2.axhline(1.0, color="grey", lw=0.8)
    a2.set_ylabel("wall-clock speed-up vs baseline")
    a2.set_title(f"CPU wall clock ({base['tok_s']:.0f} tok/s baseline)")
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=45)
    fig.suptitle("speculative decoding, synth small, repetitive code prompt (greedy, identical output)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
