"""``trtllm-loop validate``: check a checkpoint (any supported format) and optionally fix fused scales."""
from __future__ import annotations

HELP = """\
Check every shard, tensor name, dtype and shape against config.json, NaN/Inf/zero scales, global scales stored
in the other producer's convention, unequal q/k/v or gate/up global scales, quantized loop gates and
quantized tensors the config does not know. Exit status 1 when there are errors.

--fix-fused-scales OUT writes a corrected copy where each q/k/v and gate/up group shares the largest global
weight scale (and input scale): block scales are re-expressed under it, the 4-bit values stay untouched
wherever that is exact, and the report says how many blocks had to be re-quantized.

example:
  trtllm-loop validate nvfp4/
  trtllm-loop validate nvfp4/ --fix-fused-scales fixed/
"""


def register(sub):
    import argparse

    from trtllm_loop.commands.argtypes import add_force

    p = sub.add_parser("validate", help="validate a (quantized) checkpoint; optionally fix fused scales",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--fix-fused-scales", metavar="OUT", help="write a copy with shared fused global scales")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    add_force(p, "the --fix-fused-scales output")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from trtllm_loop.checkpoint.validate import ERROR, validate

    if args.fix_fused_scales:
        from trtllm_loop.quantize.fix_fused import fix_fused_scales
        rep = fix_fused_scales(args.ckpt, args.fix_fused_scales, force=args.force)
        print(rep["message"])
        args.ckpt = args.fix_fused_scales
    findings = validate(args.ckpt)
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], indent=1))
    else:
        for f in findings:
            print(f)
        n_err = sum(f.level == ERROR for f in findings)
        print(f"{args.ckpt}: {'OK' if not n_err else 'FAILED'} ({n_err} error(s), {len(findings) - n_err} "
              "warning(s))")
    return 1 if any(f.level == ERROR for f in findings) else 0
