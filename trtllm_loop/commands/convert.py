"""``trtllm-loop convert``: NVFP4 (ModelOpt or compressed-tensors) or BF16 -> ModelOpt FP8 or BF16, or any of
them -> a TensorRT-LLM engine-flow checkpoint (``--to trtllm-ckpt``)."""
from __future__ import annotations

HELP = """\
Convert a checkpoint for GPUs without FP4 tensor cores (H100/H200): --to fp8 writes a ModelOpt FP8 unified
checkpoint (per-tensor FP8 E4M3 weights, weight_scale, static input_scale; embeddings, lm_head, norms and loop
gates stay BF16; k_scale/v_scale carried over); --to bf16 writes dense BF16. SRC is validated first.
Streaming (one tensor in memory at a time), atomic (temp dir next to OUT, renamed at the end), tokenizer and
other side files copied.

Activation scales for --to fp8 come from the source's NVFP4 input_scale (W4A4 checkpoints). Weight-only
(W4A16_NVFP4, NVFP4A16) and dense sources need --calib-ids: token-id sequences run through the reference
model (both loop passes) to calibrate them.

--to trtllm-ckpt writes a TensorRT-LLM 1.2.x checkpoint for the engine flow (`build --backend tensorrt`):
config.json (num_hidden_layers = 2L KV layers, num_unique_layers = L, loop_window_size, quantization, mapping)
and rank{r}.safetensors per tensor-parallel rank (--tp), TRT-LLM names, sharded as the PyTorch backend shards.
ModelOpt NVFP4 and FP8 stay quantized (weights_scaling_factor, weights_scaling_factor_2,
activation_scaling_factor); loop gates, embedding, lm_head and norms are never quantized.

example:
  trtllm-loop convert nvfp4/ fp8/ --to fp8
  trtllm-loop convert bf16/ fp8/ --to fp8 --calib-ids calib.json
  trtllm-loop convert nvfp4/ ckpt-tp2/ --to trtllm-ckpt --tp 2
"""


def register(sub):
    import argparse

    from trtllm_loop.commands.argtypes import add_force, positive_float, positive_int

    p = sub.add_parser("convert", help="NVFP4 / BF16 -> ModelOpt FP8 or BF16 checkpoint", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("out", help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--to", required=True, choices=["fp8", "bf16", "trtllm-ckpt"])
    p.add_argument("--tp", type=positive_int, default=1, help="trtllm-ckpt: tensor-parallel ranks (default 1)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="trtllm-ckpt: activation dtype (default: the checkpoint's, else bfloat16)")
    p.add_argument("--calib-ids", nargs="+", metavar="FILE.json",
                   help="token ids for activation calibration (sources without input_scale)")
    p.add_argument("--max-shard-gb", type=positive_float, default=5.0, help="shard size limit (default 5)")
    add_force(p, "OUT")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.to == "trtllm-ckpt":
        return _run_trtllm(args)
    if args.tp != 1 or args.dtype:
        from trtllm_loop.errors import UserError
        raise UserError("--tp and --dtype apply to --to trtllm-ckpt only")
    from trtllm_loop.conformance import read_ids
    from trtllm_loop.quantize.convert import convert

    calib = read_ids(args.calib_ids) if args.calib_ids else None
    rep = convert(args.src, args.out, args.to, calib_ids=calib, max_shard_bytes=max(1, int(args.max_shard_gb * 2**30)),
                  force=args.force)
    for w in rep["warnings"]:
        print(w)
    src = rep["source_format"]
    print(f"converted {args.src} ({src['format']}, {src['quant_algo'] or 'dense'}) -> {args.out} ({args.to}): "
          f"{rep['fp8_linears']} FP8 linears, {len(rep['files'])} shard(s), kv scales: {rep['kv_scales']}, "
          f"copied: {', '.join(rep['copied']) or 'nothing'}")
    return 0


def _run_trtllm(args) -> int:
    from trtllm_loop.errors import UserError
    from trtllm_loop.trtllm.engine.checkpoint import convert_trtllm

    if args.calib_ids:
        raise UserError("--calib-ids applies to --to fp8 only; --to trtllm-ckpt keeps the source's quantization")
    rep = convert_trtllm(args.src, args.out, tp=args.tp, dtype=args.dtype, force=args.force)
    for w in rep["warnings"]:
        print(w)
    q = (rep["quantization"] or {}).get("quant_algo") or "dense"
    print(f"converted {args.src} -> {args.out} (TRT-LLM checkpoint, {q}, {rep['dtype']}, tp {rep['tp']}): "
          f"{rep['tensors']} tensors per rank, copied: {', '.join(rep['copied']) or 'nothing'}")
    return 0
