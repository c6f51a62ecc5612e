"""``trtllm-loop build CKPT --backend pytorch --config build_configs/<target>.yaml --out DEPLOY``."""
from __future__ import annotations

import argparse

from trtllm_loop.commands.argtypes import add_force, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "build", help="write a TensorRT-LLM deploy directory (PyTorch backend) for one target GPU",
        description="Validate the checkpoint, check it against the target's build config (weight format, SM, "
                    "memory, tensor parallelism) and write a self-contained deploy directory: TRT-LLM config view "
                    "(2L KV layers), weights, llm_api_options.yaml, env.sh, serve.sh (trtllm-serve, single GPU or "
                    "TP over MPI) and the Triton llmapi model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="checkpoint directory (HF layout; dense, ModelOpt NVFP4 or FP8)")
    p.add_argument("--backend", choices=["pytorch"], default="pytorch",
                   help="TensorRT-LLM backend (the TensorRT engine flow is legacy in 1.2.x)")
    p.add_argument("--config", required=True, help="build config, e.g. build_configs/b200.yaml")
    p.add_argument("--out", required=True, help="deploy directory to write")
    p.add_argument("--tp", type=positive_int, default=None, help="tensor parallel size (default: the build config's)")
    p.add_argument("--weights", choices=["link", "copy", "symlink"], default="link",
                   help="link = hard link (copy across filesystems)")
    p.add_argument("--tokenizer", default=None,
                   help="directory with the tokenizer files (tokenizer_config.json + tokenizer.model or "
                        "tokenizer.json) when CKPT has none; copied into the deploy directory")
    p.add_argument("--speculative", metavar="SPEC", default=None,
                   help="ngram[:K] (prompt lookup) or draft:PATH[:K] (a Loop draft with the same vocabulary, "
                        "deployed as DEPLOY/draft): writes speculative_config (TRT-LLM NGram / DraftTarget, K draft "
                        "tokens per step) and keeps every KV slot in the full pool -- TRT-LLM's sliding-window pool "
                        "cannot rewind draft tokens -- with the draft's weights and KV in the memory plan")
    add_force(p, "--out")
    p.set_defaults(func=run)


def run(args) -> int:
    from trtllm_loop.trtllm.deploy import build

    info = build(args.ckpt, args.config, args.out, tp=args.tp, weights=args.weights, force=args.force,
                 tokenizer=args.tokenizer, speculative=args.speculative)
    print(f"wrote {args.out}: target {info['target']}, {info['weight_format']} weights, TP {info['tensor_parallel_size']}, "
          f"{info['kv_layers']} KV layers over {info['physical_layers']} decoder layers")
    if info["speculative_config"]:
        print(f"speculative decoding: {info['speculative_config']} (every KV slot in the full pool)")
    for w in info["checkpoint_warnings"]:
        print(f"warning: {w}")
    print(f"serve with: {args.out}/serve.sh (trtllm-serve) or trtllm-loop serve {args.out}/triton_repo (Triton)")
    return 0
