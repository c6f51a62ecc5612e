"""Ground truth for the serving tests, independent of what they test: the reference model
(``trtllm_loop.modeling.load.load_model``, the HF module with its contiguous attention, a full forward over the
whole sequence at every step -- no cache, no paged runtime, no Triton model code) decoded greedily in process,
with TensorRT-LLM's stop semantics written out here again.
"""
from __future__ import annotations

import torch

# a step whose two best logits are closer than this is not a usable ground truth (float noise could flip it)
MIN_MARGIN = 1e-4


@torch.no_grad()
def greedy(model, prompt: list[int], max_tokens: int, end_ids=(), stop_ids=(), bias=None) -> list[int]:
    """Greedy continuation of ``prompt``: an id in ``end_ids`` ends it and is not returned (TRT-LLM's end_id),
    one in ``stop_ids`` ends it and is returned (single-token stop words); ``bias`` ({id: value}) is added to the
    logits first (TRT-LLM's embedding_bias)."""
    out: list[int] = []
    while len(out) < max_tokens:
        logits = model(torch.tensor([list(prompt) + out])).logits[0, -1].float()
        for t, v in (bias or {}).items():
            logits[t] += v
        top = torch.topk(logits, 2).values
        gap = float(top[0] - top[1])
        assert gap > MIN_MARGIN, f"greedy step {len(out)} after {prompt + out} is a near tie ({gap:.2e}): pick another prompt"
        t = int(torch.argmax(logits))
        if t in end_ids:
            break
        out.append(t)
        if t in stop_ids:
            break
    return out


def stop_ids(ckpt, end_id: int) -> list[int]:
    """The stop semantics of triton_repo/README.md: the tokenizer's eos is TRT-LLM's end_id (not returned); the
    model's other eos ids (generation_config.json) are single-token stop words (returned)."""
    import json
    from pathlib import Path

    return [t for t in json.loads((Path(ckpt) / "generation_config.json").read_text())["eos_token_id"] if t != end_id]
