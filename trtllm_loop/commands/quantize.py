"""``trtllm-loop quantize``: BF16 Loop checkpoint -> ModelOpt NVFP4 / W4A16_NVFP4 / FP8 unified checkpoint."""
from __future__ import annotations

HELP = """\
Post-training quantization of a dense (BF16/FP16/FP32) Loop checkpoint, with exactly ModelOpt 0.47's numbers
(mtq.quantize with max calibration + export_hf_checkpoint): same packed weights, block scales, global scales,
input scales and KV scales for the same weights, samples and dtype. Output: a ModelOpt unified HF checkpoint
(hf_quant_config.json, config.json quantization_config, tokenizer and generation files copied) that
`validate`, every runtime mode and TensorRT-LLM read.

Loop specifics: calibration sees BOTH passes of every shared layer (one static input scale per Linear covers
both); q/k/v and gate/up share their global scales (TensorRT-LLM fuses them); embeddings, lm_head, norms and
the loop gates stay unquantized.

--qformat  nvfp4 (W4A4, Blackwell), w4a16_nvfp4 (weight-only), fp8 (H100/H200). AWQ variants are refused
           with the reason (ModelOpt's AWQ search cannot be reproduced exactly here).
--kv-cache fp8 adds k_scale/v_scale (amax/448 of k_proj/v_proj outputs over both passes).
--calib    FILE: JSONL, one sample per line, {"text": "..."} (the checkpoint's tokenizer) or
           {"input_ids": [...]}; builtin: the Python standard library's sources on this machine (no download).
           One sample per forward, each cut to --seq-len tokens; the first --num-samples are used.
--mode     auto (default): in memory when the model fits in RAM, else layer-streamed; streamed: one layer in
           RAM at a time, activations and pass-1 K/V spilled to --work-dir (default .OUT.trtllm-loop-quantize-work
           next to OUT), same bytes as in memory; rerun the same command after an interruption to resume
           (finished layers are skipped). Disk space is checked before any work: the spill holds every layer's
           pass-1 K/V until pass 2 (L * 2 * kv_size * 2 bytes per calibration token: 320 KB for the 40B model,
           so 128 x 512 tokens need ~21 GB), two generations of activations and the quantized layers.
--report   also run eval-quant on --report-samples held-out samples (the ones after the calibration samples)
           and write KL, top-1 agreement and max |dlogit| per position to OUT/quant_report.json.

examples:
  trtllm-loop quantize bf16/ nvfp4/ --qformat nvfp4 --calib builtin --num-samples 128 --seq-len 512
  trtllm-loop quantize bf16/ fp8/ --qformat fp8 --kv-cache fp8 --calib calib.jsonl --report
  trtllm-loop quantize bf16-40b/ nvfp4-40b/ --qformat nvfp4 --mode streamed --work-dir /scratch/q
"""


def register(sub):
    import argparse

    from trtllm_loop.commands.argtypes import add_force, positive_float, positive_int

    p = sub.add_parser("quantize", help="BF16 -> ModelOpt NVFP4 / W4A16_NVFP4 / FP8 (both loop passes calibrated)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="dense source checkpoint directory")
    p.add_argument("out", help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--qformat", required=True, choices=["nvfp4", "w4a16_nvfp4", "fp8", "nvfp4_awq", "w4a16_awq"])
    p.add_argument("--kv-cache", choices=["fp8", "none"], default="none", help="KV-cache scales (default none)")
    p.add_argument("--calib", default="builtin", metavar="FILE|builtin", help="calibration data (default builtin)")
    p.add_argument("--num-samples", type=positive_int, default=512, help="calibration samples (default 512)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sample at most (default 512)")
    p.add_argument("--mode", choices=["auto", "memory", "streamed"], default="auto")
    p.add_argument("--work-dir", metavar="DIR", help="spill directory of the streamed mode")
    p.add_argument("--report", action="store_true", help="write OUT/quant_report.json (eval-quant, held-out data)")
    p.add_argument("--report-samples", type=positive_int, default=4, help="held-out samples for --report")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="calibration and output dtype of the unquantized tensors (default bfloat16, as ModelOpt)")
    p.add_argument("--max-shard-gb", type=positive_float, default=5.0, help="shard size limit (default 5)")
    add_force(p, "OUT")
    p.set_defaults(func=run)


def run(args) -> int:
    from trtllm_loop.modeling.load import torch_dtype
    from trtllm_loop.quantize.pipeline import quantize

    rep = quantize(args.src, args.out, args.qformat, args.kv_cache, args.calib, args.num_samples, args.seq_len,
                   args.mode, args.work_dir, args.report, args.report_samples, torch_dtype(args.dtype),
                   max(1, int(args.max_shard_gb * 2**30)), args.force)
    print(f"quantized {args.src} -> {args.out}: {rep['qformat']}, kv cache {rep['kv_cache']}, {rep['mode']} mode, "
          f"{rep['samples']} samples / {rep['tokens']} tokens, {len(rep['files'])} shard(s), "
          f"copied: {', '.join(rep['copied']) or 'nothing'}")
    if rep["report"]:
        m = rep["report"]
        print(f"report ({args.out}/quant_report.json): KL mean {m['kl_mean']:.3e}, KL max {m['kl_max']:.3e}, "
              f"top-1 {m['top1_agreement']:.3f}, max |dlogit| {m['max_abs_dlogit']:.4f}")
    return 0
