"""``trtllm-loop logits``: the conformance entry point -- fp32 logits of every position, per backend mode."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trtllm_loop.conformance import MODES, compute, read_ids
from trtllm_loop.errors import UserError
from trtllm_loop.fsutil import atomic_dir, atomic_file, check_output

HELP = """\
Compute float32 logits for every position of every sequence, with one of the project's backends:

  prefill        the reference model, one full-sequence forward per sequence
  decode         the reference model, one token at a time through its LoopCache
  paged          all sequences together through the paged runtime emulator: the first --prefill-len
                 tokens in chunks of --chunk, the rest teacher-forced one step at a time
  torch-backend  the TensorRT-LLM PyTorch-backend adapter (on the API double when TRT-LLM is missing)
  engine         the TensorRT-LLM 1.2.x engine-flow model definition, run on the API double; CKPT may be an
                 HF checkpoint (converted to a --tp rank TRT-LLM checkpoint on the fly), a TRT-LLM checkpoint
                 (`convert --to trtllm-ckpt`) or an engine directory (`build --backend tensorrt`)

With one --ids, OUT is a .npy of shape [T, V]; with several, OUT is a directory of 0.npy, 1.npy, ...
An --ids file holds a JSON list of token ids (or a list of such lists).

examples:
  trtllm-loop logits CKPT --ids a.json --ids b.json --mode paged --chunk 5 --tokens-per-block 4 --out out/
  trtllm-loop logits ckpt-tp2/ --ids a.json --mode engine --out a.npy        # a TRT-LLM checkpoint (convert)
  trtllm-loop logits engines/ --ids a.json --mode engine --prefill-len 1 --out a.npy   # built engines
"""


def register(sub):
    import argparse

    from trtllm_loop.commands.argtypes import add_force, positive_int

    p = sub.add_parser("logits", help="fp32 logits of every position (conformance entry point)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--ids", action="append", required=True, metavar="FILE.json",
                   help="token ids (JSON list); repeat for several sequences")
    p.add_argument("--mode", default="prefill", choices=MODES)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokens-per-block", type=positive_int, default=16, help="paged modes: KV block size in tokens")
    p.add_argument("--chunk", type=positive_int, default=256, help="paged modes: context chunk size in tokens")
    p.add_argument("--prefill-len", type=positive_int, default=None,
                   help="paged modes: tokens run as context (default all); the rest one per step")
    p.add_argument("--emulate-activations", choices=["nvfp4"], default=None,
                   help="reference modes: also quantize Linear inputs like W4A4 NVFP4 kernels (needs input_scale)")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="torch-backend / engine: tensor-parallel size (simulated ranks)")
    p.add_argument("--gate-plugin", action="store_true",
                   help="engine: the loop gate as the IQuestLoopGateMix plugin layer (default: functional ops)")
    p.add_argument("--out", required=True, help=".npy file (one sequence) or directory (several)")
    add_force(p, "--out")
    p.set_defaults(func=run)


def _is_npy(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


def _single(n: int, out: str) -> bool:
    if n == 1 and out.endswith(".npy"):
        return True
    if n == 1 and not Path(out).is_dir() and not out.endswith("/"):
        raise UserError(f"--out {out}: with one --ids, give a path ending in .npy")
    return False


def write_outputs(arrays: list[np.ndarray], out: str, force: bool = False, protect: tuple = ()) -> None:
    """Atomic: one .npy, or a directory of i.npy written to a temp dir and renamed (fsutil's rules: an existing
    output only with ``force``, and only if it is one of ours)."""
    if _single(len(arrays), out):
        with atomic_file(out, force, own_file=_is_npy, protect=protect) as tmp:
            np.save(tmp, arrays[0].astype(np.float32))
        return
    with atomic_dir(out, force, protect=protect) as tmp:
        for i, a in enumerate(arrays):
            np.save(tmp / f"{i}.npy", a.astype(np.float32))


def run(args) -> int:
    seqs = read_ids(args.ids)
    check_output(args.out, args.force, protect=(args.ckpt,),  # before the compute, not after
                 own_file=_is_npy if _single(len(seqs), args.out) else None)
    arrays = compute(args.ckpt, seqs, args.mode, args.dtype, args.tokens_per_block, args.chunk,
                     args.prefill_len, args.tp, args.emulate_activations, args.gate_plugin)
    write_outputs(arrays, args.out, args.force, protect=(args.ckpt,))
    shapes = ", ".join(str(list(a.shape)) for a in arrays)
    print(f"wrote {len(arrays)} logits array(s) {shapes} to {args.out} (mode {args.mode}, {args.dtype})")
    return 0
