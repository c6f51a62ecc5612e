"""``trtllm-loop`` command line. Each subcommand lives in ``trtllm_loop/commands/<name>.py`` and exposes
``register(subparsers)`` (adds its parser and sets ``func``); this file only lists them."""
from __future__ import annotations

import argparse
import importlib
import sys

# order = order in --help
COMMANDS = [
    "synth", "inspect", "logits", "generate", "demo",
    "validate", "convert", "eval_quant",
    "build", "verify",
    "triton_repo", "serve", "client",
]

EPILOG = """\
typical session:
  trtllm-loop synth /tmp/tiny --preset tiny          # random tiny checkpoint (HF layout)
  trtllm-loop inspect /tmp/tiny --gpu b200           # architecture, bytes, KV budget
  trtllm-loop generate /tmp/tiny --prompt-ids 1,2,3  # sample with the paged runtime
  trtllm-loop logits /tmp/tiny --ids a.json --mode paged --out a.npy

Run `trtllm-loop COMMAND --help` for the details of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trtllm-loop",
        description="Reference model, paged runtime emulator, TensorRT-LLM deploy builder and Triton serving "
                    "for the IQuest-Coder-V1 Loop models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"trtllm_loop.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from trtllm_loop.config import ConfigError
    from trtllm_loop.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
