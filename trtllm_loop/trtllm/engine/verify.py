"""``trtllm-loop verify --backend tensorrt``: the PyTorch-backend verify's checks and JSON report
(:mod:`trtllm_loop.trtllm.verify`) for the engine flow: synthesize the tiny model, ``build --backend tensorrt``
(engines, runtime config, Triton repository), then run the engines -- chunked prefill, decode one token per step
across the window edge, single and batched -- and compare every position with the FP32 reference.

On the API double the engines run eagerly (:mod:`.runner`); the decode tokens are the reference's greedy
continuation fed back (teacher forcing), and its top-1 agreement is reported. CUDA graphs are a runtime knob of
the C++ runtime the double does not emulate: the report says so instead of claiming a graph run."""
from __future__ import annotations

import json
from dataclasses import asdict

import yaml

from trtllm_loop.errors import UserError


def run_engine_verify(root, tllm, is_double: bool, dtype: str, tol: float, config, tp: int, seed: int,
                      geometry: str, log, gate_plugin: str | None = None) -> dict:
    from trtllm_loop.conformance import compute
    from trtllm_loop.config import LoopConfig
    from trtllm_loop.trtllm.deploy import load_build_config
    from trtllm_loop.trtllm.engine.build import build_engine
    from trtllm_loop.trtllm.engine.runner import run_logits
    from trtllm_loop.trtllm.verify import (DECODE_PAST_WINDOW, VERIFY_BUILD, _compare_logits, _versions,
                                           summarize, verify_prompts, write_model)

    if not is_double:
        raise UserError("verify --backend tensorrt --gpu is not implemented yet (it needs TensorRT-LLM 1.2.x's "
                        "ModelRunnerCpp over the engines); run it without --gpu on the API double, and on a GPU box "
                        "serve ENGINE_DIR/launch_triton.sh")
    model = write_model(root / "model", geometry, dtype, seed)
    cfg = LoopConfig.from_file(model)
    bc = asdict(load_build_config(config)) if config else dict(VERIFY_BUILD)
    bc.pop("source", None)
    W = cfg.loop_window_size
    chunk = 64  # context chunk of the runs below: the long prompt takes 3 chunks, the window inside the last
    bc.update(max_seq_len=min(max(bc["max_seq_len"], 1024), cfg.max_position_embeddings), kv_cache_dtype="auto",
              max_batch_size=max(bc["max_batch_size"], 2), max_num_tokens=max(bc["max_num_tokens"], 2 * chunk),
              weight_formats=sorted(set(bc["weight_formats"]) | {"bf16", "fp32"}), tensor_parallel_size=tp)
    bc["cuda_graph"] = {"enable_padding": True, "batch_sizes": [1, 2]}
    (root / "build_config.yaml").write_text(yaml.safe_dump(bc))
    out = root / "engine_dir"
    build_engine(model, root / "build_config.yaml", out, tp=tp, gate_plugin=gate_plugin, gather_context_logits=True,
                 force=True)
    rt = json.loads((out / "runtime_config.json").read_text())
    prompts = verify_prompts(W, cfg.vocab_size, chunk, seed)
    n_decode = W + DECODE_PAST_WINDOW
    seqs, refs = [], []
    for p in prompts:  # the reference's greedy continuation: the tokens the engine decodes, one per step
        toks = list(p)
        for _ in range(n_decode):
            [ref] = compute(str(model), [toks], "prefill", dtype="float32")
            toks.append(int(ref[-1].argmax()))
        seqs.append(toks)
        refs.append(ref)
    log(f"verify: TensorRT engines on the API double, {dtype}, TP {tp}, {geometry} model (W = {W}), prompts of "
        f"{[len(p) for p in prompts]} tokens, chunk {chunk}, {n_decode} decode steps, tolerance {tol:g}")
    runs = []
    for batch in ([0], [0, 1]):
        # prompt 0's prefill length for every sequence in the step: prefill chunked, the rest one token per step
        got = run_logits(out, [seqs[i] for i in batch], dtype=dtype, chunk=chunk, prefill_len=len(prompts[0]))
        reqs = []
        for j, i in enumerate(batch):
            P, ref = len(prompts[i]), refs[i]
            pre = _compare_logits(got[j][:P], ref[:P])
            pre["passed"] = pre["max_abs"] <= tol
            dec = _compare_logits(got[j][P - 1:P - 1 + n_decode], ref[P - 1:P - 1 + n_decode])
            dec["per_step"] = dec.pop("per_position")
            dec["positions"] = list(range(P - 1, P - 1 + n_decode))
            dec["window_edge_positions"] = [t for t in (W - 1, W, W + 1) if P <= t <= P + n_decode - 2]
            dec["passed"] = dec["max_abs"] <= tol
            reqs.append({"prompt": i, "length": P, "generated": n_decode, "prefill": pre, "decode": dec})
            log(f"  batch {len(batch)} prompt {i} ({P} tokens): prefill max |dlogit| {pre['max_abs']:.3g}, decode "
                f"({n_decode} steps, window edge {dec['window_edge_positions']}) {dec['max_abs']:.3g}  "
                f"{'PASS' if pre['passed'] and dec['passed'] else 'FAIL'}")
        runs.append({"cuda_graphs": "not emulated by the API double (runtime_config.json sets cuda_graph_mode)",
                     "batch": [len(prompts[i]) for i in batch], "requests": reqs})
    phases, passed = summarize(runs, tol, log)
    return {"passed": passed, "backend": "tensorrt", "runtime": "TensorRT engines on the API double",
            "versions": _versions(tllm, is_double), "dtype": dtype, "model": geometry, "window": W, "tp": tp,
            "tolerance": tol, "chunk": chunk, "decode_steps": n_decode, "phases": phases, "runs": runs,
            "runtime_config": rt}
