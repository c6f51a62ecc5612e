"""``trtllm-loop verify [--backend pytorch|tensorrt] [--gpu]``: end-to-end check of the TensorRT-LLM deployment."""
from __future__ import annotations

import argparse

from trtllm_loop.commands.argtypes import positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="deploy a tiny model and compare TensorRT-LLM's logits with the reference",
        description="Synthesize a tiny model, build its deploy directory, run prompts through TensorRT-LLM's LLM "
                    "API and compare the logits (or top-k log-probs) with the reference model, printing the "
                    "largest deviation per position. --gpu uses the installed TensorRT-LLM on a GPU (BF16); "
                    "without it the flow runs on the API double (FP32, CI).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=["pytorch", "tensorrt"], default="pytorch",
                   help="pytorch: the LLM API deploy directory; tensorrt: TensorRT engines (TRT-LLM 1.2.x engine flow)")
    p.add_argument("--gate-plugin", default=None, metavar="LIB",
                   help="tensorrt: build the engines with the gate plugin from this library")
    p.add_argument("--gpu", action="store_true", help="run on the installed TensorRT-LLM and a GPU")
    p.add_argument("--config", default=None,
                   help="build config to start from (default: built-in B200-like settings scaled to the tiny model)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size (simulated ranks on the double)")
    p.add_argument("--work", default=None, help="keep the model, deploy dir and report.json here")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                   help="write the machine-readable report here (per phase prefill/decode: max |delta|, window-edge "
                        "positions, pass/fail; versions of TRT-LLM, torch, GPU, SM)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--model", choices=["tiny", "gpu"], default=None,
                   help="model geometry: tiny (head_dim 16, W 16) or gpu (head_dim 128, W 64); default gpu with --gpu")
    p.set_defaults(func=run)


def run(args) -> int:
    from trtllm_loop.trtllm.verify import verify

    report = verify(gpu=args.gpu, config=args.config, tp=args.tp, work=args.work, keep=args.keep, model=args.model,
                    json_out=args.json_out, backend=args.backend, gate_plugin=args.gate_plugin)
    return 0 if report["passed"] else 1
