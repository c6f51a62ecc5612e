"""``trtllm-loop inspect``: architecture, sizes, KV-cache arithmetic and what fits on a GPU."""
from __future__ import annotations

import json
from pathlib import Path

# usable device memory (GB, 1e9) and the default fraction TRT-LLM may use; see shared performance anchors
GPUS = {
    "b200": (180.0, 0.90, "B200 (SM100), HBM3e"),
    "gb10": (128.0, 0.70, "DGX Spark GB10 (SM121), unified LPDDR5X shared with the OS"),
    "rtx-pro-6000": (96.0, 0.90, "RTX PRO 6000 Blackwell (SM120), GDDR7"),
    "h100": (80.0, 0.90, "H100 SXM (SM90), HBM3"),
    "h200": (141.0, 0.90, "H200 SXM (SM90), HBM3e"),
}
ACTIVATION_RESERVE_GB = 4.0  # activations, CUDA graphs, workspace: a conservative flat reserve

HELP = """\
Print the architecture, parameter count, weight bytes, the two KV caches' bytes per token (pass 1 keeps
every token; pass 2 keeps only the last loop_window_size tokens of each sequence), and -- with --gpu --
how many tokens and full-length sequences fit in the KV budget of that GPU.

With --speculative (ngram[:K] or draft:PATH[:K]) the GPU plan is that of a speculative TRT-LLM deploy
(`build --speculative`): every KV slot at full length plus 2K draft tokens per sequence (TRT-LLM's window
pool cannot rewind drafts), and a draft model's weights and KV.

example:
  trtllm-loop synth /tmp/40b --preset 40b-shape && trtllm-loop inspect /tmp/40b --gpu b200 --max-seq-len 32768
  trtllm-loop inspect /tmp/40b --gpu b200 --max-seq-len 32768 --speculative draft:/tmp/7b-loop:4
"""


def register(sub):
    import argparse

    from trtllm_loop.commands.argtypes import positive_int

    p = sub.add_parser("inspect", help="architecture, bytes, KV arithmetic, GPU fit", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint directory (config.json required; weights optional)")
    p.add_argument("--gpu", choices=sorted(GPUS), help="size the KV cache for this GPU")
    p.add_argument("--max-seq-len", type=positive_int, default=None, help="sequence length for sizing "
                   "(default: max_position_embeddings)")
    p.add_argument("--kv-dtype", default="bfloat16", choices=["bfloat16", "fp8", "float32"])
    p.add_argument("--speculative", metavar="SPEC", default=None,
                   help="size for speculative decoding: ngram[:K] or draft:PATH[:K] (see above)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def weight_bytes(ckpt: Path, cfg) -> tuple[int, str]:
    """On-disk weight bytes: the index's total_size, else the safetensors files, else params x 2."""
    from trtllm_loop.checkpoint.hf import INDEX, read_index

    if (ckpt / INDEX).is_file():
        total = read_index(ckpt)["metadata"].get("total_size")
        if total:
            return int(total), "index total_size"
    files = list(ckpt.glob("*.safetensors"))
    if files:
        return sum(f.stat().st_size for f in files), "safetensors files"
    return cfg.num_parameters() * 2, "parameters x 2 (bf16)"


def report(ckpt: str, gpu: str | None = None, max_seq_len: int | None = None, kv_dtype: str = "bfloat16",
           speculative: str | None = None) -> dict:
    from trtllm_loop.config import KV_DTYPE_BYTES, LoopConfig

    cfg = LoopConfig.from_file(ckpt)
    seq = max_seq_len or cfg.max_position_embeddings
    wb, wsrc = weight_bytes(Path(ckpt), cfg)
    kv = cfg.kv_bytes_per_token(kv_dtype)
    r = {
        "checkpoint": str(ckpt),
        "architecture": {"layers": cfg.num_hidden_layers, "loop_num": cfg.loop_num, "hidden": cfg.hidden_size,
                         "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                         "head_dim": cfg.head_dim, "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
                         "loop_window_size": cfg.loop_window_size, "rope_theta": cfg.rope_theta,
                         "tie_word_embeddings": cfg.tie_word_embeddings, "eos_token_id": list(cfg.eos_token_id),
                         "kv_slots": cfg.num_kv_slots, "window_pattern": cfg.window_pattern(seq)},
        "parameters": cfg.num_parameters(),
        "weight_bytes": wb, "weight_bytes_source": wsrc,
        "kv_dtype": kv_dtype,
        "kv_bytes_per_token": {"pass1_full": kv["pass1"], "pass2_window": kv["pass2"]},
        "kv_bytes_per_sequence_at_max_len": cfg.kv_bytes_per_sequence(seq, kv_dtype),
        "max_seq_len": seq,
    }
    try:
        from trtllm_loop.checkpoint import describe_checkpoint
    except ImportError:
        describe_checkpoint = None
    if describe_checkpoint is not None and any(Path(ckpt).glob("*.safetensors")):
        r["format"] = describe_checkpoint(ckpt)
    per_seq = cfg.kv_bytes_per_sequence(seq, kv_dtype)
    if speculative:
        from trtllm_loop.trtllm.deploy.speculative import kv_bytes_per_sequence, parse

        spec = parse(speculative, cfg)
        per_seq = kv_bytes_per_sequence(cfg, seq, spec.extra_tokens, KV_DTYPE_BYTES[kv_dtype])
        r["speculative"] = {"kind": spec.kind, "max_draft_len": spec.k, "extra_kv_tokens_per_sequence":
                            spec.extra_tokens, "target_kv_bytes_per_sequence": per_seq}
        if spec.draft_cfg is not None:
            dwb, _ = weight_bytes(spec.draft, spec.draft_cfg)
            dkv = kv_bytes_per_sequence(spec.draft_cfg, seq, spec.extra_tokens, KV_DTYPE_BYTES[kv_dtype])
            r["speculative"].update(draft_weight_bytes=dwb, draft_kv_bytes_per_sequence=dkv)
            wb, per_seq = wb + dwb, per_seq + dkv
        r["speculative"]["kv_bytes_per_sequence"] = per_seq
    if gpu:
        mem, frac, desc = GPUS[gpu]
        budget = mem * 1e9 * frac - wb - ACTIVATION_RESERVE_GB * 1e9
        r["gpu"] = {"name": gpu, "description": desc, "memory_bytes": mem * 1e9, "memory_fraction": frac,
                    "activation_reserve_bytes": ACTIVATION_RESERVE_GB * 1e9, "kv_budget_bytes": max(budget, 0),
                    "fits_weights": budget > 0}
        if budget > 0:
            r["gpu"]["max_tokens_in_pass1_cache"] = int(budget // kv["pass1"])
            r["gpu"]["max_sequences_at_max_len"] = int(budget // per_seq)
    return r


def _gb(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:,.2f} {unit}"
    return f"{b:,.0f} B"


def run(args) -> int:
    r = report(args.ckpt, args.gpu, args.max_seq_len, args.kv_dtype, args.speculative)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    a = r["architecture"]
    print(f"{r['checkpoint']}: IQuestLoopCoder, {a['layers']} layers x {a['loop_num']} passes "
          f"({a['kv_slots']} KV slots, windows {a['window_pattern']} repeating)")
    print(f"  hidden {a['hidden']}, heads {a['heads']} q / {a['kv_heads']} kv x {a['head_dim']}, "
          f"MLP {a['intermediate']}, vocab {a['vocab']}, window {a['loop_window_size']}, "
          f"rope_theta {a['rope_theta']:g}, tied embeddings {a['tie_word_embeddings']}, eos {a['eos_token_id']}")
    print(f"  parameters {r['parameters']:,}; weights {_gb(r['weight_bytes'])} ({r['weight_bytes_source']})")
    if "format" in r:
        from trtllm_loop.checkpoint import describe_lines

        for line in describe_lines(r["format"]):
            print(f"  {line}")
    kv = r["kv_bytes_per_token"]
    print(f"  KV ({r['kv_dtype']}): pass-1 cache {kv['pass1_full']:,} B/token (every token); pass-2 cache "
          f"{kv['pass2_window']:,} B/token for the last {a['loop_window_size']} tokens only")
    print(f"  one sequence of {r['max_seq_len']:,} tokens: {_gb(r['kv_bytes_per_sequence_at_max_len'])} of KV")
    if "speculative" in r:
        sp = r["speculative"]
        draft = (f" + draft {_gb(sp['draft_weight_bytes'])} weights, {_gb(sp['draft_kv_bytes_per_sequence'])} KV"
                 if "draft_weight_bytes" in sp else "")
        print(f"  speculative {sp['kind']} K={sp['max_draft_len']}: every KV slot at full length + "
              f"{sp['extra_kv_tokens_per_sequence']} draft tokens: {_gb(sp['target_kv_bytes_per_sequence'])} of KV "
              f"per sequence{draft}")
    if "gpu" in r:
        g = r["gpu"]
        print(f"  on {g['description']}: {_gb(g['memory_bytes'])} x {g['memory_fraction']} - weights - "
              f"{_gb(g['activation_reserve_bytes'])} reserve = KV budget {_gb(g['kv_budget_bytes'])}")
        if not g["fits_weights"]:
            print("  the weights do not fit on this GPU: use a smaller format (NVFP4 / FP8) or tensor parallelism")
        else:
            print(f"  fits {g['max_tokens_in_pass1_cache']:,} cached tokens, or "
                  f"{g['max_sequences_at_max_len']:,} sequences of {r['max_seq_len']:,} tokens")
    return 0
