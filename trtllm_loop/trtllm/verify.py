"""``trtllm-loop verify``: synthesize a tiny model, deploy it, run prompts through TensorRT-LLM's LLM API and
compare the logits with the reference model, position by position.

With ``--gpu`` it needs TensorRT-LLM 1.2.1 and a CUDA GPU (BF16 weights and kernels, a head_dim-128 model,
compared with the FP32 reference of the same weights); without it the same flow runs on the API double (FP32,
tolerance 1e-4), which is what CI executes. Prompts are chosen so that
positions cross the loop window (W-1, W, W+1) and the context-chunk edges, where off-by-one windows and chunking
bugs show (``shared/docs/tensorrt-llm.md`` 3.4.1).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from trtllm_loop.errors import UserError

# the verify target: B200-like settings scaled down to the tiny model; a 39-token step budget splits the
# three prompts into 13-token chunks, so chunk edges fall between window edges
VERIFY_BUILD = dict(target="verify", sm=100, gpu_memory_gib=180, unified_memory=False,
                    weight_formats=["nvfp4", "bf16", "fp32"], kv_cache_dtype="auto", tensor_parallel_size=1,
                    max_batch_size=4, max_seq_len=256, max_num_tokens=39, tokens_per_block=32,
                    free_gpu_memory_fraction=0.5, host_cache_size=0, enable_block_reuse=False,
                    enable_chunked_prefill=True, cuda_graph={"enable_padding": True, "batch_sizes": [1, 2, 4]},
                    nvfp4_gemm_allowed_backends=["cutlass", "cublaslt", "cuda_core"])
# --model gpu: TRT-LLM's fused attention kernels are built for the usual head sizes (64, 128, ...), not the 16 of
# the CPU preset; this geometry has the released head_dim, GQA group 2 and the released window of 64
GPU_MODEL = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=128, loop_window_size=64,
                 max_position_embeddings=4096)
FP32_TOL = 1e-4   # FP32 runtime vs FP32 reference (the double; golden-case tolerance)
BF16_TOL = 0.25   # BF16 kernels vs the FP32 reference of the same BF16 weights (bf16 vs fp32 on the golden
                  # cases is ~0.1; an off-by-one window or a missing gate moves logits by > 0.5 there)
TOP_K = 5


def verify_prompts(window: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Three prompts: past the window edge, past three windows, and exactly two windows long."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in (window + 2, 3 * window + 5, 2 * window)]


def _compare_logits(got: np.ndarray, ref: np.ndarray) -> dict:
    dev = np.abs(got.astype(np.float64) - ref.astype(np.float64)).max(-1)
    return {"per_position": dev.tolist(), "max_abs": float(dev.max()),
            "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def _compare_logprobs(prompt_logprobs: list, ref: np.ndarray) -> dict:
    """Where the API gives top-k log-probs only: compare them with the reference's log-softmax at the same
    token ids. Entry t is the distribution after position t (aligned to the end when one is missing)."""
    ref64 = ref.astype(np.float64)
    lse = np.log(np.exp(ref64 - ref64.max(-1, keepdims=True)).sum(-1)) + ref64.max(-1)
    ref_lp = ref64 - lse[:, None]
    offset = len(ref) - len(prompt_logprobs)
    dev = [max(abs(lp.logprob - ref_lp[t + offset, tok]) for tok, lp in d.items()) if d else 0.0
           for t, d in enumerate(prompt_logprobs) if d is not None]
    return {"per_position": dev, "max_abs": float(max(dev)), "top1_agree": None}


def write_model(out: Path, geometry: str, dtype: str, seed: int) -> Path:
    """The model to deploy: synth's ``tiny`` preset, or the GPU geometry above (synth's weight recipe)."""
    from trtllm_loop.synth import synthesize

    if geometry == "tiny":
        return synthesize(out, "tiny", seed=seed, dtype=dtype, tokenizer=False, overwrite=True)
    import torch
    from safetensors.torch import save_file

    from trtllm_loop.config import ARCHITECTURE, MODEL_TYPE, LoopConfig
    from trtllm_loop.synth import random_weights

    cfg = LoopConfig.from_dict({"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, **GPU_MODEL,
                                "torch_dtype": dtype})
    out.mkdir(parents=True, exist_ok=True)
    save_file(random_weights(cfg, seed, getattr(torch, dtype)), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out


def verify(*, gpu: bool = False, config: str | None = None, tp: int = 1, work: str | None = None,
           keep: bool = False, seed: int = 0, model: str | None = None, log=print) -> dict:
    from trtllm_loop.trtllm.compat import ensure_tensorrt_llm

    tllm, is_double = ensure_tensorrt_llm(prefer_double=not gpu)
    if gpu:
        import torch
        if is_double or not torch.cuda.is_available():
            raise UserError("verify --gpu needs TensorRT-LLM 1.2.1 importable (`import tensorrt_llm`) and a CUDA GPU; "
                            "run it in the TensorRT-LLM container, or drop --gpu to check the flow on the API double")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtype, tol = ("bfloat16", BF16_TOL) if gpu else ("float32", FP32_TOL)
    geometry = model or ("gpu" if gpu else "tiny")
    if geometry not in ("tiny", "gpu"):
        raise UserError(f"--model {geometry!r}: allowed tiny (CPU preset) or gpu (head_dim 128, W 64)")
    root = Path(work) if work else Path(tempfile.mkdtemp(prefix="trtllm-loop-verify-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        report = _run(root, tllm, is_double, dtype, tol, config, tp, seed, geometry, log)
        (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if not (work or keep):
            shutil.rmtree(root, ignore_errors=True)
    return report


def _run(root: Path, tllm, is_double: bool, dtype: str, tol: float, config, tp: int, seed: int, geometry: str,
         log) -> dict:
    from trtllm_loop.conformance import compute
    from trtllm_loop.config import LoopConfig
    from trtllm_loop.trtllm.deploy import build, load_build_config
    import trtllm_loop.trtllm.torch_backend.modeling_iquest_loop  # noqa: F401  (what --custom_module_dirs imports)

    model = write_model(root / "model", geometry, dtype, seed)
    cfg = LoopConfig.from_file(model)
    bc = asdict(load_build_config(config)) if config else dict(VERIFY_BUILD)
    bc.pop("source", None)
    bc.update(max_seq_len=min(bc["max_seq_len"], 256), max_batch_size=max(bc["max_batch_size"], 3),
              weight_formats=sorted(set(bc["weight_formats"]) | {"bf16", "fp32"}))
    (root / "build_config.yaml").write_text(yaml.safe_dump(bc))
    deploy = root / "deploy"
    build(model, root / "build_config.yaml", deploy, tp=tp, force=True)
    plan = json.loads((deploy / "memory_plan.json").read_text())
    if plan["window_size_shares"]:
        os.environ["TRTLLM_WINDOW_SIZE_SHARES"] = ",".join(f"{s:.6f}" for s in plan["window_size_shares"])
    opts = yaml.safe_load((deploy / "llm_api_options.yaml").read_text())

    prompts = verify_prompts(cfg.loop_window_size, cfg.vocab_size, seed)
    llm = tllm.LLM(model=str(deploy), backend="pytorch", tensor_parallel_size=tp, **opts)
    outs = llm.generate(prompts, tllm.SamplingParams(max_tokens=1, return_context_logits=True))
    refs = compute(str(model), prompts, "prefill", dtype="float32")  # the same weights, exact arithmetic
    runtime = "API double" if is_double else f"TensorRT-LLM {tllm.__version__}"
    log(f"verify: {runtime}, {dtype}, TP {tp}, {geometry} model (W = {cfg.loop_window_size}), "
        f"{len(prompts)} prompts, chunk budget {opts['max_num_tokens']} tokens, tolerance {tol:g}")
    results = []
    for i, (out, ref, prompt) in enumerate(zip(outs, refs, prompts)):
        if out.context_logits is not None:
            res = _compare_logits(np.asarray(out.context_logits.float().cpu()), ref)
        else:  # the API returned no context logits: fall back to top-k prompt log-probs
            [lp] = llm.generate([prompt], tllm.SamplingParams(max_tokens=1, prompt_logprobs=TOP_K))
            res = _compare_logprobs(lp.outputs[0].prompt_logprobs, ref)
        res.update(prompt=i, length=len(prompt), passed=res["max_abs"] <= tol)
        results.append(res)
        worst = int(np.argmax(res["per_position"]))
        log(f"  prompt {i}: {len(prompt)} tokens, max |dlogit| {res['max_abs']:.3g} at position {worst}"
            + (f", top-1 agreement {res['top1_agree']:.0%}" if res["top1_agree"] is not None else "")
            + f"  {'PASS' if res['passed'] else 'FAIL'}")
        W = cfg.loop_window_size
        for t, d in enumerate(res["per_position"]):
            mark = " <- window edge" if t in (W - 1, W, W + 1) else ""
            log(f"    pos {t:3d}  {d:.3e}{mark}")
    passed = all(r["passed"] for r in results)
    log(f"verify: {'PASS' if passed else 'FAIL'} (largest deviation {max(r['max_abs'] for r in results):.3g}, "
        f"tolerance {tol:g})")
    return {"passed": passed, "runtime": runtime, "dtype": dtype, "model": geometry, "tp": tp, "tolerance": tol,
            "prompts": results}
