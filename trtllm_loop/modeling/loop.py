"""The loop schedule, in one place (``shared/docs/loop-architecture.md`` section 3).

:func:`loop_forward` is the only code that orders the two passes. Every runtime -- the HF reference model, the
paged runtime emulator and the TensorRT-LLM PyTorch-backend model -- calls it with its own layers and its own
*attention backend*; none writes the passes again.

The model it runs has
    ``model.layers[l].qkv(h) -> [..., q_size + 2 * kv_size]``
        the fused, **pre-RoPE** q|k|v of the layer's input norm of ``h`` (TRT-LLM's ``qkv_proj``);
    ``model.layers[l].finish(h, heads) -> h``
        ``h + o_proj(heads)`` (heads ``[..., H, D]``, token-major concat), then the SwiGLU MLP block;
    ``model.gate_projections[l](q_rot) -> [..., H, 1]``
        the loop gate ``sigmoid(q_rot[h] . Wg[h] + bg[h])`` of the **post-RoPE** pass-2 query;
    ``model.norm(h)``
        the final RMSNorm, once after pass 2.

The backend implements TensorRT-LLM's attention contract
    ``backend.attend(slot, qkv) -> [..., H, D]``
        RoPE at the step's positions, append k/v to KV slot ``slot`` at those positions (writing identical
        values again is a no-op), then attention of q over the slot up to each query's position, restricted to
        the slot's window from :meth:`LoopConfig.slot_plan` (W keys, the current one included; None = full);
    ``backend.rope_q(q) -> q_rot``
        RoPE of a query ``[..., H, D]`` at the step's positions;
    ``backend.gated_mix(gate_projection, q, global_out, local_out) -> [..., H, D]`` (optional)
        a fused pass-2 gate and mix from the **pre-RoPE** q (the gate plugin / op); without it :func:`gated_mix`
        composes ``rope_q``, the gate and ``mix``;
    ``backend.glue`` (optional)
        how fused q|k|v is carved and joined: :class:`TorchGlue` (eager torch) by default; a graph-building
        backend (the TensorRT engine flow, whose ``tensorrt_llm.functional.Tensor`` has no indexing and is no
        ``torch`` tensor) brings its own.

Slot plan (:mod:`trtllm_loop.config`): pass 1 of layer l -> slot 2l (full); pass 2 local -> slot 2l+1 (window W);
pass 2 global -> slot 2l again, fed the pass-1 K/V of the same tokens (an idempotent re-append), so no read-only
attention is ever needed. The pass-1 K/V wait for pass 2 in a :class:`Stash`.
"""
from __future__ import annotations

import torch

from trtllm_loop.config import LoopConfig
from trtllm_loop.modeling.ops import mix


class Stash:
    """The pass-1 pre-RoPE ``k|v`` of the step's tokens, per layer, until the pass-2 global branch re-appends
    them. This one keeps references (eager runtimes)."""

    def __init__(self):
        self._kv: dict[int, torch.Tensor] = {}

    def put(self, layer: int, kv: torch.Tensor) -> None:
        self._kv[layer] = kv

    def get(self, layer: int) -> torch.Tensor:
        return self._kv[layer]


class BufferStash(Stash):
    """A stash in a preallocated ``[L, max_tokens, 2 * kv_size]`` buffer: no allocation, host sync or
    data-dependent branch, so a step that uses it can be captured in a CUDA graph (the TRT-LLM model)."""

    def __init__(self, buffer: torch.Tensor, num_tokens: int):
        self.buffer, self.n = buffer, num_tokens

    def put(self, layer: int, kv: torch.Tensor) -> None:
        self.buffer[layer, :self.n].copy_(kv)

    def get(self, layer: int) -> torch.Tensor:
        return self.buffer[layer, :self.n]


class TorchGlue:
    """Carving and joining fused q|k|v with torch ops (every eager backend)."""

    @staticmethod
    def split_q(qkv: torch.Tensor, q_size: int):
        """``[..., q_size + 2 * kv_size]`` -> (q ``[..., q_size]``, k|v ``[..., 2 * kv_size]``)."""
        return qkv[..., :q_size], qkv[..., q_size:]

    @staticmethod
    def join(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return torch.cat([q, kv], dim=-1)

    @staticmethod
    def heads(q: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
        return q.unflatten(-1, (num_heads, head_dim))


def gated_mix(backend, gate_projection, q: torch.Tensor, global_out: torch.Tensor,
              local_out: torch.Tensor) -> torch.Tensor:
    """Pass 2's heads ``g * global + (1 - g) * local`` with ``g = gate_projection(RoPE(q))``, q pre-RoPE
    ``[..., H, D]``: the backend's fused ``gated_mix`` where it has one, else the separate ops."""
    fused = getattr(backend, "gated_mix", None)
    if fused is not None:
        return fused(gate_projection, q, global_out, local_out)
    return mix(gate_projection(backend.rope_q(q)), global_out, local_out)


def loop_forward(model, h: torch.Tensor, backend, cfg: LoopConfig, stash: Stash | None = None) -> torch.Tensor:
    """Both passes over the shared layers; h is the embedded input ``[..., hidden]``; returns the final-normed
    hidden state. ``cfg`` gives the head layout of the layers' q|k|v (per rank under tensor parallelism)."""
    stash = Stash() if stash is None else stash
    glue = getattr(backend, "glue", TorchGlue)
    qs, heads = cfg.q_size, (cfg.num_attention_heads, cfg.head_dim)
    for l, layer in enumerate(model.layers):  # pass 1: plain Llama
        qkv = layer.qkv(h)
        stash.put(l, glue.split_q(qkv, qs)[1])
        h = layer.finish(h, backend.attend(cfg.pass1_slot(l), qkv))
    for l, layer in enumerate(model.layers):  # pass 2: gated mix of global and local attention
        qkv = layer.qkv(h)
        q = glue.split_q(qkv, qs)[0]
        global_out = backend.attend(cfg.pass1_slot(l), glue.join(q, stash.get(l)))
        local_out = backend.attend(cfg.pass2_slot(l), qkv)
        h = layer.finish(h, gated_mix(backend, model.gate_projections[l], glue.heads(q, *heads), global_out,
                                      local_out))
    return model.norm(h)
