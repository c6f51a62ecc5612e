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

# the verify target: B200-like settings scaled down to the tiny model. With a window shorter than max_seq_len,
# TRT-LLM's context-chunk unit is 256 tokens (py_executor_creator.py), so a 256-token step budget splits the long
# prompt into 256-token chunks (deploy.memory.alone_chunks) with the window inside the last one
VERIFY_BUILD = dict(target="verify", sm=100, gpu_memory_gib=180, unified_memory=False,
                    weight_formats=["nvfp4", "bf16", "fp32"], kv_cache_dtype="auto", tensor_parallel_size=1,
                    max_batch_size=4, max_seq_len=1024, max_num_tokens=256, tokens_per_block=32,
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
DECODE_PAST_WINDOW = 8  # decode W + 8 tokens: positions W - 1, W, W + 1 of the short prompt are decode steps


def verify_prompts(window: int, vocab: int, chunk: int, seed: int = 0) -> list[list[int]]:
    """Two prompts: ``short`` (W - 4 tokens, so decode crosses the window edge) and ``long`` (two full chunks
    plus W + 5 tokens: chunked prefill, the window inside the last chunk)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in (max(1, window - 4), 2 * chunk + window + 5)]


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


def summarize(runs: list, tol: float, log) -> tuple[dict, bool]:
    """The report's ``phases`` (prefill / decode: worst |delta|, window-edge positions, pass) over every request
    of every run, and the verdict, logged."""
    every = [r for run in runs for r in run["requests"]]
    phases = {
        "prefill": {"max_abs": max(r["prefill"]["max_abs"] for r in every),
                    "passed": all(r["prefill"]["passed"] for r in every)},
        "decode": {"max_abs": max(r["decode"]["max_abs"] for r in every),
                   "window_edge_positions": sorted({t for r in every for t in r["decode"]["window_edge_positions"]}),
                   "passed": all(r["decode"]["passed"] for r in every)},
    }
    passed = phases["prefill"]["passed"] and phases["decode"]["passed"]
    log(f"verify: {'PASS' if passed else 'FAIL'} (prefill {phases['prefill']['max_abs']:.3g}, decode "
        f"{phases['decode']['max_abs']:.3g}, tolerance {tol:g})")
    return phases, passed


def write_model(out: Path, geometry: str, dtype: str, seed: int) -> Path:
    """The model to deploy: synth's ``tiny`` preset, or the GPU geometry above (synth's weight recipe)."""
    from trtllm_loop.synth import synthesize

    if geometry == "tiny":  # with its tokenizer: the deploy directory carries it (end_id, Triton text)
        return synthesize(out, "tiny", seed=seed, dtype=dtype, tokenizer=True, overwrite=True)
    import torch
    from safetensors.torch import save_file

    from trtllm_loop.config import ARCHITECTURE, MODEL_TYPE, LoopConfig
    from trtllm_loop.synth import random_weights
    from trtllm_loop.synth.tokenizer import write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    special = write_tokenizer(out, GPU_MODEL["vocab_size"])
    cfg = LoopConfig.from_dict({"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, **GPU_MODEL,
                                "torch_dtype": dtype, **special})
    save_file(random_weights(cfg, seed, getattr(torch, dtype)), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out


def verify(*, gpu: bool = False, config: str | None = None, tp: int = 1, work: str | None = None,
           keep: bool = False, seed: int = 0, model: str | None = None, json_out: str | None = None,
           log=print, backend: str = "pytorch", gate_plugin: str | None = None) -> dict:
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
    if json_out and not Path(json_out).resolve().parent.is_dir():
        raise UserError(f"--json {json_out}: its directory does not exist; create it or pick another path")
    root = Path(work) if work else Path(tempfile.mkdtemp(prefix="trtllm-loop-verify-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if backend == "tensorrt":  # the engine flow (TRT-LLM 1.2.x): trtllm_loop/trtllm/engine/verify.py
            from trtllm_loop.trtllm.engine.verify import run_engine_verify
            report = run_engine_verify(root, tllm, is_double, dtype, tol, config, tp, seed, geometry, log,
                                       gate_plugin=gate_plugin)
        else:
            saved = {k: os.environ.get(k) for k in WORKER_ENV}
            try:
                report = _run(root, tllm, is_double, dtype, tol, config, tp, seed, geometry, log)
            finally:  # the worker environment is for this run only: leave the caller's as it was
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        text = json.dumps(report, indent=2) + "\n"
        (root / "report.json").write_text(text)
        if json_out:  # written whole, then renamed: never a partial report
            tmp = Path(json_out).with_name(Path(json_out).name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, json_out)
    finally:
        if not (work or keep):
            shutil.rmtree(root, ignore_errors=True)
    return report


def _versions(tllm, is_double: bool) -> dict:
    import torch

    v = {"tensorrt_llm": None if is_double else str(tllm.__version__), "api_double": is_double,
         "torch": torch.__version__, "gpu": None, "sm": None}
    if not is_double and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        v.update(gpu=torch.cuda.get_device_name(), sm=major * 10 + minor)
    return v


WORKER_ENV = ("TRTLLM_WINDOW_SIZE_SHARES", "PYTHONPATH")


def _worker_env(deploy: Path, plan: dict) -> None:
    """What TRT-LLM's MPI worker processes need, set before ``LLM(...)`` spawns them (they inherit this
    environment, not later changes): the VSWA pool shares, and the deploy directory's package + the
    sitecustomize hook that registers the Loop model in every new interpreter."""
    from trtllm_loop.trtllm.deploy.memory import shares_env

    if plan["window_size_shares"]:
        os.environ["TRTLLM_WINDOW_SIZE_SHARES"] = shares_env(plan["window_size_shares"])
    paths = [str(deploy / "triton_hooks"), str(deploy / "python")]
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + old)


def _run(root: Path, tllm, is_double: bool, dtype: str, tol: float, config, tp: int, seed: int, geometry: str,
         log) -> dict:
    from trtllm_loop.conformance import compute
    from trtllm_loop.config import LoopConfig
    from trtllm_loop.trtllm.deploy import build, load_build_config
    from trtllm_loop.trtllm.deploy.memory import alone_chunks, chunk_unit
    import trtllm_loop.trtllm.torch_backend.modeling_iquest_loop  # noqa: F401  (what --custom_module_dirs imports)

    model = write_model(root / "model", geometry, dtype, seed)
    cfg = LoopConfig.from_file(model)
    bc = asdict(load_build_config(config)) if config else dict(VERIFY_BUILD)
    bc.pop("source", None)
    W = cfg.loop_window_size
    bc.update(max_seq_len=min(max(bc["max_seq_len"], 1024), cfg.max_position_embeddings),
              max_batch_size=max(bc["max_batch_size"], 2), weight_formats=sorted(set(bc["weight_formats"]) | {"bf16", "fp32"}))
    unit = chunk_unit(bc["tokens_per_block"], cfg.window_pattern(bc["max_seq_len"]), bc["max_seq_len"])
    bc["max_num_tokens"] = max(unit, min(bc["max_num_tokens"], unit))  # one chunk unit per step: several chunks
    bc["cuda_graph"] = {"enable_padding": True, "batch_sizes": [1, 2]}
    (root / "build_config.yaml").write_text(yaml.safe_dump(bc))
    deploy = root / "deploy"
    build(model, root / "build_config.yaml", deploy, tp=tp, force=True)
    plan = json.loads((deploy / "memory_plan.json").read_text())
    _worker_env(deploy, plan)
    opts = yaml.safe_load((deploy / "llm_api_options.yaml").read_text())
    chunk = opts["max_num_tokens"]
    prompts = verify_prompts(W, cfg.vocab_size, chunk, seed)
    n_decode = W + DECODE_PAST_WINDOW
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, (list, tuple)) else cfg.eos_token_id
    # end_id given explicitly (the deploy directory carries the tokenizer too); ignore_eos: decode every step;
    # top_k 1: greedy
    sp = tllm.SamplingParams(max_tokens=n_decode, end_id=eos, ignore_eos=True, top_k=1,
                             return_context_logits=True, return_generation_logits=True)
    runtime = "API double" if is_double else f"TensorRT-LLM {tllm.__version__}"
    log(f"verify: {runtime}, {dtype}, TP {tp}, {geometry} model (W = {W}), prompts of {[len(p) for p in prompts]} "
        f"tokens, chunk unit {unit}, step budget {chunk} tokens, {n_decode} decode steps, tolerance {tol:g}")
    runs = []
    # CUDA graphs on (batch sizes 1 and 2: the short prompt alone, then both) and off (both, batched)
    for graphs, batch in ((True, [0]), (True, [0, 1]), (False, [0, 1])):
        kw = dict(opts, cuda_graph_config=opts["cuda_graph_config"] if graphs else None)
        llm = tllm.LLM(model=str(deploy), backend="pytorch", tensor_parallel_size=tp, **kw)
        try:
            outs = llm.generate([prompts[i] for i in batch], sp)
            scheduled = getattr(llm, "scheduled_chunks", None)  # the double reports what it scheduled
            graph_steps = getattr(llm, "graph_steps", None)
            fallback = [llm.generate([prompts[i]], tllm.SamplingParams(max_tokens=1, end_id=eos, prompt_logprobs=TOP_K))
                        [0] if o.context_logits is None else None for i, o in zip(batch, outs)]
        finally:
            llm.shutdown()
        reqs = []
        for j, (i, out) in enumerate(zip(batch, outs)):
            prompt, gen = prompts[i], list(out.outputs[0].token_ids)
            [ref] = compute(str(model), [prompt + gen], "prefill", dtype="float32")  # the same tokens, exact math
            P = len(prompt)
            if out.context_logits is not None:
                pre = _compare_logits(np.asarray(out.context_logits.float().cpu()), ref[:P])
            else:  # the API returned no context logits: top-k prompt log-probs
                pre = _compare_logprobs(fallback[j].outputs[0].prompt_logprobs, ref[:P])
            pre["passed"] = pre["max_abs"] <= tol
            gl = out.outputs[0].generation_logits
            if gl is None or len(gen) != n_decode:
                dec = {"per_step": [], "max_abs": float("inf"), "positions": [], "window_edge_positions": [],
                       "passed": False, "error": f"{len(gen)} tokens, generation logits "
                                                 f"{'missing' if gl is None else 'returned'}"}
            else:
                g = np.asarray(gl.float().cpu()).reshape(-1, ref.shape[-1])[-n_decode:]
                dec = _compare_logits(g, ref[P - 1:P - 1 + n_decode])
                dec["per_step"] = dec.pop("per_position")
                # step k scores the token after position P - 1 + k; steps 1.. are decode steps fed at P .. 
                dec["positions"] = list(range(P - 1, P - 1 + n_decode))
                dec["window_edge_positions"] = [t for t in (W - 1, W, W + 1) if P <= t <= P + n_decode - 2]
                dec["passed"] = dec["max_abs"] <= tol
            planned = alone_chunks(P, chunk, unit)
            reqs.append({"prompt": i, "length": P, "generated": len(gen), "planned_chunks": planned,
                         "scheduled_chunks": scheduled[j] if scheduled else None, "prefill": pre, "decode": dec})
            log(f"  cuda graphs {'on ' if graphs else 'off'} batch {len(batch)} prompt {i} ({P} tokens, chunks "
                f"{planned}): prefill max |dlogit| {pre['max_abs']:.3g}, decode ({n_decode} steps, window edge "
                f"{dec['window_edge_positions']}) {dec['max_abs']:.3g}  "
                f"{'PASS' if pre['passed'] and dec['passed'] else 'FAIL'}")
        runs.append({"cuda_graphs": graphs, "batch": [len(prompts[i]) for i in batch], "requests": reqs,
                     "graph_eligible_steps": graph_steps})
    phases, passed = summarize(runs, tol, log)
    return {"passed": passed, "runtime": runtime, "versions": _versions(tllm, is_double), "dtype": dtype,
            "model": geometry, "window": W, "tp": tp, "tolerance": tol, "chunk_unit": unit,
            "max_num_tokens": chunk, "decode_steps": n_decode, "phases": phases, "runs": runs}
