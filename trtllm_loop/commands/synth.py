"""``trtllm-loop synth``: write a random checkpoint in the released HF layout."""
from __future__ import annotations

HELP = """\
Write a synthetic IQuestLoopCoder checkpoint (config.json, generation_config.json, safetensors weights,
and a small SentencePiece tokenizer when the serving extra is installed) with realistic statistics:
scaled-Gaussian weights, norm weights near 1, every gate bias +2.0 as in the released model.

presets:
  tiny       vocab 512, hidden 64, 2 layers, 4 q / 2 kv heads x 16, window 16      (~0.1 M params)
  small      vocab 2048, hidden 256, 4 layers, 8 q / 2 kv heads x 32, window 64, two shards + index
  40b-shape  the released 40B-Loop shape: config.json + model.safetensors.index.json only (for
             `inspect` and sizing); no weights are written

example:
  trtllm-loop synth /tmp/tiny --preset tiny --dtype float32
"""


def register(sub):
    import argparse

    from trtllm_loop.commands.argtypes import add_force, nonneg_int

    p = sub.add_parser("synth", help="write a random checkpoint (tiny / small / 40b-shape)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output checkpoint directory (must not exist unless --force)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "40b-shape"])
    p.add_argument("--seed", type=nonneg_int, default=0, help="RNG seed (same seed -> same bytes)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype on disk (the released model is bfloat16)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write tokenizer files")
    add_force(p, "OUT")
    p.set_defaults(func=run)


def run(args) -> int:
    from trtllm_loop.synth import synthesize

    out = synthesize(args.out, args.preset, args.seed, args.dtype, tokenizer=not args.no_tokenizer,
                     overwrite=args.force)
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0
