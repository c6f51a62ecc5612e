"""The attention primitive with TensorRT-LLM's contract, over the paged cache.

TRT-LLM's ``Attention`` op (``tensorrt_llm/_torch/attention_backend/trtllm.py``, release 1.2.1) takes a
packed batch of tokens (no padding; per-sequence lengths in the metadata), **fused pre-RoPE QKV**, applies RoPE
inside, appends the new K/V to the layer's paged cache at the positions the metadata gives, then attends the
queries over that cache (windowed when ``attention_window_size`` is set: W keys including the current one).
:class:`PagedBackend` is that op, for the loop model's slots; :func:`trtllm_loop.modeling.loop.loop_forward`
drives it exactly as it drives the real op inside the TRT-LLM model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trtllm_loop.config import LoopConfig
from trtllm_loop.modeling.loop import loop_forward
from trtllm_loop.modeling.ops import apply_rope, attention_core, rope_cos_sin, split_qkv, window_mask
from trtllm_loop.runtime.kv_cache import PagedKVCache


@dataclass
class StepMetadata:
    """Per step: which sequences, how many tokens each already had (``past``) and brings (``new``).
    Tokens are packed sequence after sequence, ``sum(new)`` rows in all."""

    seq_ids: list[int]
    past: list[int]
    new: list[int]

    def positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(p, p + n) for p, n in zip(self.past, self.new)])

    def spans(self):
        start = 0
        for seq, p, n in zip(self.seq_ids, self.past, self.new):
            yield seq, p, n, slice(start, start + n)
            start += n


class PagedBackend:
    """``attend(slot, qkv)`` on packed tokens: fused pre-RoPE qkv ``[N, q_size + 2 * kv_size]``; the slot's
    window comes from the slot plan."""

    def __init__(self, cache: PagedKVCache, meta: StepMetadata, cfg: LoopConfig, dtype: torch.dtype):
        self.cache, self.meta, self.cfg = cache, meta, cfg
        self.cos, self.sin = rope_cos_sin(meta.positions(), cfg.head_dim, cfg.rope_theta, dtype)

    def rope_q(self, q: torch.Tensor) -> torch.Tensor:
        return apply_rope(q, self.cos, self.sin)

    def attend(self, slot: int, qkv: torch.Tensor) -> torch.Tensor:
        window = self.cfg.slot_window(slot)
        q, k, v = split_qkv(qkv, self.cfg)
        q, k = self.rope_q(q), apply_rope(k, self.cos, self.sin)
        out = torch.empty_like(q)
        for seq, past, n, rows in self.meta.spans():
            self.cache.write(slot, seq, past, k[rows], v[rows])          # append (idempotent on re-append)
            lo = 0 if window is None else max(0, past - window + 1)      # oldest key any query here can see
            keys, vals = self.cache.read(slot, seq, lo, past + n)        # then attend over the slot
            allowed = window_mask(torch.arange(past, past + n), torch.arange(lo, past + n), window)
            out[rows] = attention_core(q[rows][None], keys[None], vals[None], allowed[None])[0]
        return out


def forward_step(model, cache: PagedKVCache, meta: StepMetadata, ids: torch.Tensor) -> torch.Tensor:
    """One packed step of a reference-layout model over ``cache``: allocate the blocks the step's positions
    land in, embed, run :func:`loop_forward` with :class:`PagedBackend`; the final-normed hidden states."""
    for seq, past, n in zip(meta.seq_ids, meta.past, meta.new):
        cache.prepare(seq, past, n)
    cfg = model.model.loop_config
    h = model.model.embed_tokens(ids)
    return loop_forward(model.model, h, PagedBackend(cache, meta, cfg, model.lm_head.weight.dtype), cfg)
