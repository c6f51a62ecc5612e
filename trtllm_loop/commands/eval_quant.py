"""``trtllm-loop eval-quant``: how close a quantized checkpoint's logits are to its reference's."""
from __future__ import annotations

import json

HELP = """\
Run the reference model (fp32 prefill) on REF and on QUANT for every --ids sequence and report, per
position and overall: KL(ref || quant) in nats, top-1 agreement and max |delta logit|.
QUANT may be any format trtllm-loop reads (ModelOpt NVFP4 / W4A16_NVFP4 / FP8, compressed-tensors NVFP4 /
NVFP4A16, dense). --emulate-activations nvfp4 also quantizes each Linear input (W4A4) under the checkpoint's
static input_scale.

example:
  trtllm-loop eval-quant ref/ nvfp4/ --ids a.json --ids b.json --json report.json
"""


def register(sub):
    import argparse

    p = sub.add_parser("eval-quant", help="KL / top-1 / max |dlogit| of a quantized checkpoint vs its reference",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", help="reference checkpoint directory (e.g. the BF16 original)")
    p.add_argument("quant", help="quantized checkpoint directory")
    p.add_argument("--ids", action="append", required=True, nargs="+", metavar="FILE.json",
                   help="token ids (JSON list, or list of lists); repeatable")
    p.add_argument("--emulate-activations", choices=["nvfp4"], default=None)
    p.add_argument("--json", metavar="OUT.json", help="also write the full report (per position) here")
    p.add_argument("--per-position", action="store_true", help="print one table row per position")
    p.set_defaults(func=run)


def run(args) -> int:
    from trtllm_loop.conformance import read_ids
    from trtllm_loop.quantize.evaluate import eval_quant

    files = [f for group in args.ids for f in group]
    seqs = read_ids(files)
    rep = eval_quant(args.ref, args.quant, seqs, args.emulate_activations)
    print(f"{'seq':>4} {'pos':>5} {'KL mean':>10} {'KL max':>10} {'top-1':>7} {'max|dlogit|':>12}")
    for i, s in enumerate(rep["sequences"]):
        print(f"{i:>4} {s['positions']:>5} {s['kl_mean']:>10.3e} {s['kl_max']:>10.3e} "
              f"{s['top1_agreement']:>7.3f} {s['max_abs_dlogit']:>12.4f}")
        if args.per_position:
            pp = s["per_position"]
            for t, (kl, ok, d) in enumerate(zip(pp["kl"], pp["top1"], pp["max_abs_dlogit"])):
                print(f"{'':>4} {t:>5} {kl:>10.3e} {'':>10} {int(ok):>7} {d:>12.4f}")
    m = rep["summary"]
    print(f"{'all':>4} {m['positions']:>5} {m['kl_mean']:>10.3e} {m['kl_max']:>10.3e} "
          f"{m['top1_agreement']:>7.3f} {m['max_abs_dlogit']:>12.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
        print(f"wrote {args.json}")
    return 0
