"""The conformance driver: fp32 logits of every position of token sequences, through any of the project's
backends (``prefill``/``decode``: the HF reference model; ``paged``: the paged runtime emulator;
``torch-backend``: the TensorRT-LLM PyTorch-backend adapter, on the API double when TRT-LLM is missing;
``engine``: the TensorRT-LLM engine-flow model definition, on the API double).

``trtllm-loop logits``, ``convert``/``eval-quant`` (``read_ids``), ``verify`` and the tests call it; expected
logits always come from elsewhere (golden files, the NumPy oracle, another mode)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trtllm_loop.errors import UserError

MODES = ("prefill", "decode", "paged", "torch-backend", "engine")


def read_ids(files: list[str]) -> list[list[int]]:
    seqs = []
    for f in files:
        try:
            data = json.loads(Path(f).read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise UserError(f"{f}: --ids file not found") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise UserError(f"{f}: not valid JSON ({e or 'nested too deeply'}); expected a list of token ids") from None
        group = data if isinstance(data, list) and data and isinstance(data[0], list) else [data]
        for s in group:
            if not isinstance(s, list) or not s or not all(isinstance(t, int) and not isinstance(t, bool) for t in s):
                raise UserError(f"{f}: expected a non-empty JSON list of integer token ids")
            seqs.append(s)
    return seqs


def compute(ckpt: str, seqs: list[list[int]], mode: str, dtype: str = "float32", tokens_per_block: int = 16,
            chunk: int = 256, prefill_len: int | None = None, tp: int = 1,
            emulate_activations: str | None = None, gate_plugin: bool = False) -> list[np.ndarray]:
    import torch

    from trtllm_loop.config import LoopConfig

    if mode == "engine":  # CKPT may also be a TRT-LLM checkpoint or an engine directory
        if emulate_activations:
            raise UserError("--emulate-activations is for the reference modes")
        from trtllm_loop.trtllm.engine.runner import run_logits as run_engine

        return run_engine(ckpt, seqs, dtype=dtype, tokens_per_block=tokens_per_block, chunk=chunk,
                          prefill_len=prefill_len, tp_size=tp, gate_plugin=gate_plugin)
    if gate_plugin:
        raise UserError("--gate-plugin applies to --mode engine only")
    cfg = LoopConfig.from_file(ckpt)
    for i, s in enumerate(seqs):
        bad = [t for t in s if not 0 <= t < cfg.vocab_size]
        if bad:
            raise UserError(f"sequence {i}: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    if mode == "torch-backend":
        if emulate_activations:
            raise UserError("--emulate-activations is for the reference modes; --mode torch-backend quantizes the "
                            "activations of W4A4 checkpoints itself, as TensorRT-LLM does")
        from trtllm_loop.trtllm.torch_backend import run_logits

        return run_logits(ckpt, seqs, dtype=dtype, tokens_per_block=tokens_per_block, chunk=chunk,
                          prefill_len=prefill_len, tp_size=tp)
    if tp != 1:
        raise UserError("--tp applies to --mode torch-backend and --mode engine only")
    from trtllm_loop.modeling.load import load_model

    model = load_model(ckpt, dtype, emulate_activations)
    out = []
    with torch.no_grad():
        if mode == "paged":
            from trtllm_loop.runtime import LoopRuntime

            rt = LoopRuntime(model, tokens_per_block=tokens_per_block, chunk_size=chunk,
                             max_num_tokens=max(chunk * len(seqs), len(seqs)), max_batch_size=len(seqs),
                             max_seq_len=max(len(s) for s in seqs) + 1, debug=True)  # assert re-appends
            return [x.numpy() for x in rt.score(seqs, prefill_len)]
        for s in seqs:
            ids = torch.tensor([s])
            if mode == "prefill":
                out.append(model(ids).logits[0].float().numpy())
            else:
                cache, rows = None, []
                for t in range(len(s)):
                    o = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                    cache = o.past_key_values
                    rows.append(o.logits[0, -1].float())
                out.append(torch.stack(rows).numpy())
    return out
