"""The loop math, in one place (``shared/docs/loop-architecture.md`` section 3).

Every runtime of this project -- the HF reference model, the paged runtime emulator and the TensorRT-LLM
adapters -- runs :func:`loop_forward` (or translates it one-to-one). What differs between them is only the
*attention backend*: an object that implements TRT-LLM's attention contract

    ``backend.attend(slot, qkv, window) -> out [..., H, D]``
        qkv ``[..., (H + 2 Hkv) * D]`` is the **fused, pre-RoPE** q|k|v (:func:`split_qkv`); the backend
        applies RoPE at the step's positions, writes k/v into KV slot ``slot`` at those positions (writing
        identical values again is a no-op), and returns the attention of q over the slot's keys up to each
        query's position, restricted to the last ``window`` keys (current one included) when ``window`` is set.
    ``backend.rope_q(q) -> q_rot``
        RoPE of a query at the step's positions (the gate reads the post-RoPE query).

Slot plan (:mod:`trtllm_loop.config`): pass 1 of layer l -> slot 2l (full); pass 2 local -> slot 2l+1
(window W); pass 2 global -> slot 2l again, fed the pass-1 K/V of the same tokens (an idempotent re-append),
so no read-only attention is ever needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trtllm_loop.config import LoopConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) computed in fp32, cast back to x's dtype, then scaled by weight (HF Llama order)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """omega_i = theta^(-2i / head_dim), i < head_dim / 2, fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 inv_freq: torch.Tensor | None = None):
    """cos/sin tables ``[..., head_dim]`` for integer positions (fp32 angles, then cast; rotate-half layout).
    Pass a precomputed ``inv_freq`` on the positions' device to keep host-to-device copies out of a forward."""
    inv = rope_inv_freq(head_dim, theta).to(positions.device) if inv_freq is None else inv_freq
    angles = positions.to(torch.float32)[..., None] * inv  # [..., D/2]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX / rotate-half RoPE. x ``[..., H, D]``; cos/sin ``[..., D]`` (broadcast over heads)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention with GQA and an explicit boolean mask.

    q ``[B, Tq, H, D]``, k/v ``[B, Tk, Hkv, D]`` (post-RoPE), allowed ``[B, Tq, Tk]`` -> ``[B, Tq, H, D]``.
    Query head h reads KV head ``h // (H // Hkv)``. Scores in the activation dtype, softmax in fp32.
    """
    H, Hkv = q.shape[-2], k.shape[-2]
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=-2)
        v = v.repeat_interleave(H // Hkv, dim=-2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    scores = scores.float().masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(1, 2)


def window_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, window: int | None) -> torch.Tensor:
    """allowed[i, j]: key j is at or before query i and, with a window, among the last ``window`` keys
    (the current token included): ``q - window < k <= q``."""
    allowed = k_idx[None, :] <= q_idx[:, None]
    if window is not None:
        allowed &= k_idx[None, :] > q_idx[:, None] - window
    return allowed


def compute_gate(q_rot: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """g[h] = sigmoid(q_rot[h] . Wg[h] + bg[h]) per head, from the **post-RoPE** pass-2 query.

    q_rot ``[..., H, D]``, weight ``[H, D]``, bias ``[H]`` -> ``[..., H, 1]``.
    """
    return torch.sigmoid((q_rot * weight).sum(-1) + bias).unsqueeze(-1)


def mix(gate: torch.Tensor, global_out: torch.Tensor, local_out: torch.Tensor) -> torch.Tensor:
    """g * global + (1 - g) * local, per head."""
    return gate * global_out + (1 - gate) * local_out


def project_qkv(layer, a: torch.Tensor) -> torch.Tensor:
    """Fused pre-RoPE ``q|k|v`` ``[..., q_size + 2 * kv_size]`` of a decoder layer (TRT-LLM's qkv_proj)."""
    attn = layer.self_attn
    return torch.cat([attn.q_proj(a), attn.k_proj(a), attn.v_proj(a)], dim=-1)


def split_qkv(qkv: torch.Tensor, cfg: LoopConfig):
    """Fused ``[..., q_size + 2 * kv_size]`` -> q ``[..., H, D]``, k ``[..., Hkv, D]``, v ``[..., Hkv, D]``."""
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    shape = qkv.shape[:-1]
    return (q.reshape(*shape, cfg.num_attention_heads, cfg.head_dim),
            k.reshape(*shape, cfg.num_key_value_heads, cfg.head_dim),
            v.reshape(*shape, cfg.num_key_value_heads, cfg.head_dim))


def finish_layer(layer, h: torch.Tensor, attn_heads: torch.Tensor, cfg: LoopConfig) -> torch.Tensor:
    """Residual + o_proj of the token-major head concat, then the SwiGLU MLP block."""
    h = h + layer.self_attn.o_proj(attn_heads.flatten(-2))
    a = rms_norm(h, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
    mlp = layer.mlp
    return h + mlp.down_proj(F.silu(mlp.gate_proj(a)) * mlp.up_proj(a))


def loop_forward(model, h: torch.Tensor, backend, cfg: LoopConfig) -> torch.Tensor:
    """Both passes over the shared layers; returns the final-normed hidden state.

    ``model`` has ``layers`` (decoder layers), ``gate_projections`` and ``norm`` (the HF module names);
    h is the embedded input ``[..., hidden]``.
    """
    eps, W, qs = cfg.rms_norm_eps, cfg.loop_window_size, cfg.q_size
    stash = []  # pass-1 pre-RoPE k|v of this step, per layer (re-appended by the pass-2 global branch)
    for l, layer in enumerate(model.layers):  # pass 1: plain Llama
        qkv = project_qkv(layer, rms_norm(h, layer.input_layernorm.weight, eps))
        out = backend.attend(cfg.pass1_slot(l), qkv, None)
        stash.append(qkv[..., qs:])
        h = finish_layer(layer, h, out, cfg)
    for l, layer in enumerate(model.layers):  # pass 2: gated mix of global and local attention
        qkv = project_qkv(layer, rms_norm(h, layer.input_layernorm.weight, eps))
        q = qkv[..., :qs]
        gp = model.gate_projections[l]
        gate = compute_gate(backend.rope_q(q.unflatten(-1, (cfg.num_attention_heads, cfg.head_dim))),
                            gp.weight, gp.bias)
        global_out = backend.attend(cfg.pass1_slot(l), torch.cat([q, stash[l]], dim=-1), None)
        local_out = backend.attend(cfg.pass2_slot(l), qkv, W)
        h = finish_layer(layer, h, mix(gate, global_out, local_out), cfg)
    return rms_norm(h, model.norm.weight, eps)
