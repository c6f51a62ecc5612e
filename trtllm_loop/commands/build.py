"""``trtllm-loop build CKPT --backend pytorch|tensorrt --config build_configs/<target>.yaml --out DIR``."""
from __future__ import annotations

import argparse

from trtllm_loop.commands.argtypes import add_force, positive_int


EXAMPLES = """\
examples:
  trtllm-loop build nvfp4/ --config build_configs/b200.yaml --out deploy/            # trtllm-serve / Triton llmapi
  trtllm-loop build nvfp4/ --config build_configs/b200.yaml --out deploy/ --speculative ngram:4
  trtllm-loop build fp8/ --config build_configs/h200-fp8.yaml --out deploy/ --speculative draft:small-fp8/:4
  make plugins && trtllm-loop build nvfp4/ --backend tensorrt --config build_configs/b200.yaml \\
      --out engines/ --gate-plugin build/plugins                                       # Triton tensorrtllm
  trtllm-loop convert bf16/ ckpt-tp2/ --to trtllm-ckpt --tp 2 && \\
      trtllm-loop build ckpt-tp2/ --backend tensorrt --config build_configs/b200.yaml --out engines-tp2/
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after each option; the description wrapped, the examples (epilog) kept as written."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "build", help="write a TensorRT-LLM deploy directory (PyTorch backend) or engine directory (TensorRT)",
        description="Validate the checkpoint, check it against the target's build config (weight format, SM, "
                    "memory, tensor parallelism) and write a self-contained deploy directory: TRT-LLM config view "
                    "(2L KV layers), weights, llm_api_options.yaml, env.sh, serve.sh (trtllm-serve, single GPU or "
                    "TP over MPI) and the Triton llmapi model. --backend tensorrt (TensorRT-LLM 1.2.x only, the "
                    "legacy engine flow) instead converts to a TRT-LLM checkpoint if needed, builds one TensorRT "
                    "engine per rank (on the API double where TensorRT-LLM is absent), and writes the runtime "
                    "config (CUDA graphs, KV fraction, window vector), the gate plugin library (--gate-plugin) and "
                    "the Triton tensorrtllm (C++ backend) repository with an LD_PRELOAD launcher.",
        epilog=EXAMPLES, formatter_class=_Formatter)
    p.add_argument("ckpt", help="checkpoint directory (HF layout; dense, ModelOpt NVFP4 or FP8)")
    p.add_argument("--backend", choices=["pytorch", "tensorrt"], default="pytorch",
                   help="pytorch: LLM API deploy directory (recommended); tensorrt: TensorRT engines (TRT-LLM 1.2.x)")
    p.add_argument("--gate-plugin", default=None, metavar="LIB",
                   help="tensorrt: the loop gate as the IQuestLoopGateMix plugin from this library (or its "
                        "directory, plugins/loop_gate build output); default: the gate in plain TensorRT ops")
    p.add_argument("--gather-context-logits", action="store_true",
                   help="tensorrt: engines that return every context token's logits (for scoring; costs memory)")
    p.add_argument("--config", required=True, help="build config, e.g. build_configs/b200.yaml")
    p.add_argument("--out", required=True, help="deploy (pytorch) or engine (tensorrt) directory to write")
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
    if args.backend == "tensorrt":
        return _run_tensorrt(args)
    if args.gate_plugin or args.gather_context_logits:
        from trtllm_loop.errors import UserError
        raise UserError("--gate-plugin and --gather-context-logits apply to --backend tensorrt")
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


def _run_tensorrt(args) -> int:
    from trtllm_loop.trtllm.engine.build import build_engine

    info = build_engine(args.ckpt, args.config, args.out, tp=args.tp, gate_plugin=args.gate_plugin,
                        tokenizer=args.tokenizer, gather_context_logits=args.gather_context_logits, force=args.force)
    print(f"wrote {args.out}: TensorRT-LLM {info['trtllm_version']} engines for {info['target']} (SM{info['sm']}), "
          f"{info['weight_format']} weights, TP {info['tensor_parallel_size']}, {info['kv_layers']} KV layers over "
          f"{info['physical_layers']} blocks, gate: {info['gate']}" + (" (API double)" if info["api_double"] else ""))
    for w in info["warnings"]:
        print(f"warning: {w}")
    print(f"serve with: {args.out}/launch_triton.sh (Triton tensorrtllm backend)")
    return 0
