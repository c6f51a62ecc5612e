"""``trtllm-loop`` command line. Each subcommand lives in ``trtllm_loop/commands/<name>.py`` and exposes
``register(subparsers)`` (adds its parser and sets ``func``); this file only lists them."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# order = order in --help
COMMANDS = [
    "synth", "inspect", "logits", "generate", "demo",
    "validate", "convert", "quantize", "eval_quant",
    "build", "verify",
    "triton_repo", "serve", "client", "bench",
]

EPILOG = """\
typical session:
  trtllm-loop synth /tmp/tiny --preset tiny          # random tiny checkpoint (HF layout)
  trtllm-loop inspect /tmp/tiny --gpu b200           # architecture, bytes, KV budget
  trtllm-loop generate /tmp/tiny --prompt-ids 1,2,3  # sample with the paged runtime
  trtllm-loop logits /tmp/tiny --ids a.json --mode paged --out a.npy

Run `trtllm-loop COMMAND --help` for the details of each command.

errors: a mistake in the input (a path, a flag, a checkpoint file) prints one line `error: ...` naming the
file, field or flag and the fix, and exits 2; nothing is left half-written. --debug (or the environment
variable TRTLLM_LOOP_DEBUG=1) shows the Python traceback instead, for bug reports.

outputs: a command refuses to write over an existing non-empty output unless --force, and --force replaces
only an output trtllm-loop wrote itself (it carries a .trtllm-loop-output marker); nothing is written inside
the input checkpoint. Temporary directories left by an interrupted run (.NAME.trtllm-loop-tmp-*) are removed
by the next run writing next to them.
"""
DEBUG_ENV = "TRTLLM_LOOP_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trtllm-loop",
        description="Reference model, paged runtime emulator, TensorRT-LLM deploy builder and Triton serving "
                    "for the IQuest-Coder-V1 Loop models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help=f"show Python tracebacks instead of one-line errors (also: {DEBUG_ENV}=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"trtllm_loop.commands.{name}").register(sub)
    return p


def _printable(msg: str) -> str:
    """Messages quote user data: never let a lone surrogate (from a corrupt file) crash the error report."""
    return msg.encode("utf-8", "backslashreplace").decode("utf-8")


def _debug(args) -> bool:
    return getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false",
                                                                                                 "no")


def main(argv: list[str] | None = None) -> int:
    """Run one command. UserError (and OS errors such as a missing file or a full disk) -> one line on stderr,
    exit 2; any other exception -> one line naming it as an internal error, exit 1. --debug / TRTLLM_LOOP_DEBUG
    re-raise instead (the traceback)."""
    from trtllm_loop.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError) as e:
        if _debug(args):
            raise
        msg = str(e) if isinstance(e, UserError) else f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        msg = " ".join(msg.split()) if isinstance(e, OSError) else msg
        print(f"error: {_printable(msg)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, the traceback on request
        if _debug(args):
            raise
        print(f"error: internal error {type(e).__name__}: {_printable(str(e))} (rerun with --debug or "
              f"{DEBUG_ENV}=1 for the "
              "traceback, and report it)", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
