"""Format gating: which weight format a checkpoint is, and whether a target can run it (each refusal names
the fix)."""
from __future__ import annotations

from pathlib import Path

from trtllm_loop.config import ConfigError, LoopConfig
from trtllm_loop.errors import UserError

from .build_config import BuildConfig

DENSE_FORMATS = ("bf16", "fp16", "fp32")


def weight_format(ckpt: Path, cfg: LoopConfig) -> str:
    """nvfp4 | fp8 | bf16 | fp16 | fp32, from the checkpoint's quantization config (NVFP4 issue readers)."""
    from trtllm_loop.checkpoint import detect_format

    info = detect_format(ckpt)
    algo = (info.quant_algo or "").upper()
    if info.format == "compressed-tensors":
        raise UserError(f"{info.source}: compressed-tensors NVFP4 is read by trtllm-loop's own runtimes, but "
                        "TensorRT-LLM 1.2.1's PyTorch backend loads ModelOpt checkpoints; re-export with ModelOpt "
                        "(hf_ptq.py --qformat nvfp4, see docs/nvfp4.md)")
    if algo in ("NVFP4_AWQ", "W4A16_NVFP4"):
        raise UserError(f"{info.source}: quant_algo {info.quant_algo} is not a QuantAlgo of TensorRT-LLM 1.2.1 (its FP4 "
                        "algos are NVFP4, W4A8_NVFP4_FP8 and MXFP4 variants), so the PyTorch backend cannot load it; "
                        "re-export with ModelOpt --qformat nvfp4 (W4A4), or `trtllm-loop convert CKPT --to fp8`")
    if algo == "NVFP4":
        return "nvfp4"
    if algo.startswith("FP8"):
        return "fp8"
    if algo:
        raise UserError(f"{info.source}: quant_algo {info.quant_algo!r} is not deployable with this builder; "
                        "allowed: NVFP4, FP8, or a dense checkpoint")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", None: "bf16"}[cfg.torch_dtype]


def replicate_kv(fmt: str) -> bool:
    """Whether TRT-LLM may replicate KV heads over more ranks than there are KV heads: dense k/v weights only
    (``duplicate_kv_weight`` copies weight and bias, not quantization scales; see trtllm/API.md)."""
    return fmt in DENSE_FORMATS


def allowed_tp(cfg: LoopConfig, fmt: str = "bf16") -> list[int]:
    """serve.sh's allowed --tp values: the one TP rule, :meth:`LoopConfig.tp_sizes`, for this weight format."""
    return cfg.tp_sizes(replicate_kv=replicate_kv(fmt))


def check_combination(bc: BuildConfig, cfg: LoopConfig, fmt: str, tp: int,
                      ckpt: str | Path = "the checkpoint") -> None:
    """Refuse what the target cannot run, naming the fix."""
    where = bc.source or bc.target
    if fmt not in bc.weight_formats:
        if fmt == "nvfp4" and bc.sm < 100:
            fix = ("Hopper has no FP4 tensor cores: make an FP8 checkpoint with `trtllm-loop convert CKPT --to fp8` "
                   f"and build that with {where}")
        elif fmt in DENSE_FORMATS and "nvfp4" in bc.weight_formats:
            fix = "quantize it to NVFP4 first (ModelOpt hf_ptq.py --qformat nvfp4, docs/nvfp4.md)"
        elif fmt in (*DENSE_FORMATS, "nvfp4") and "fp8" in bc.weight_formats:
            fix = "make an FP8 checkpoint with `trtllm-loop convert CKPT --to fp8`"
        else:
            fix = "pick a build config that lists it"
        raise UserError(f"{where}: target {bc.target} (SM{bc.sm}) accepts weight formats {bc.weight_formats}, "
                        f"the checkpoint is {fmt}; {fix}")
    if bc.kv_cache_dtype == "nvfp4" and bc.sm != 100:
        raise UserError(f"{where}: field 'kv_cache_dtype' nvfp4 needs SM100 (trtllm-gen attention); on SM{bc.sm} "
                        "use fp8")
    if fmt == "nvfp4" and not bc.nvfp4_gemm_allowed_backends:
        raise UserError(f"{where}: field 'nvfp4_gemm_allowed_backends' is empty but the checkpoint is NVFP4")
    if bc.sm == 121 and set(bc.nvfp4_gemm_allowed_backends) - {"cublaslt"}:
        raise UserError(f"{where}: field 'nvfp4_gemm_allowed_backends' is {bc.nvfp4_gemm_allowed_backends}; on SM121 "
                        "(GB10) only cublaslt works in 1.2.1 (CUTLASS tiles exceed its shared memory, TRT-LLM issue "
                        "#11368): set [cublaslt]")
    if bc.unified_memory and bc.host_cache_size:
        raise UserError(f"{where}: field 'host_cache_size' must be 0 on unified memory (the host tier is the same "
                        "physical memory, TRT-LLM issue #15793)")
    try:
        cfg.check_tp(tp, f"{ckpt} ({fmt})", replicate_kv=replicate_kv(fmt))
    except ConfigError as e:
        raise UserError(f"{e}; pass --tp or set field 'tensor_parallel_size' of {where} to one of them") from None
    if bc.max_seq_len > cfg.max_position_embeddings:
        raise UserError(f"{where}: field 'max_seq_len' {bc.max_seq_len} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings} (RoPE positions it was not trained for); set max_seq_len "
                        f"<= {cfg.max_position_embeddings}")
    if bc.enable_block_reuse:
        raise UserError(f"{where}: field 'enable_block_reuse' must stay false: block reuse with VSWA and the loop's "
                        "same-slot re-append is unproven (TRT-LLM PRs #10183, #10875)")
