"""The pure primitives of the loop math (``shared/docs/loop-architecture.md`` section 3): RMSNorm, RoPE,
attention with an explicit mask, the window mask, the fused-QKV split, the loop gate and the gated mix.

No state and no module layout: :mod:`trtllm_loop.modeling.loop` (the schedule), every attention backend
(HF reference, paged runtime, TRT-LLM adapter and its API double) and the TRT-LLM layers call these."""
from __future__ import annotations

import torch

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


def gate(q_rot: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """g[h] = sigmoid(q_rot[h] . Wg[h] + bg[h]) per head, from the **post-RoPE** pass-2 query.

    q_rot ``[..., H, D]``, weight ``[H, D]``, bias ``[H]`` -> ``[..., H, 1]``.
    """
    return torch.sigmoid((q_rot * weight).sum(-1) + bias).unsqueeze(-1)


def mix(g: torch.Tensor, global_out: torch.Tensor, local_out: torch.Tensor) -> torch.Tensor:
    """g * global + (1 - g) * local, per head."""
    return g * global_out + (1 - g) * local_out


def split_qkv(qkv: torch.Tensor, cfg: LoopConfig):
    """Fused ``[..., q_size + 2 * kv_size]`` -> q ``[..., H, D]``, k ``[..., Hkv, D]``, v ``[..., Hkv, D]``."""
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    shape = qkv.shape[:-1]
    return (q.reshape(*shape, cfg.num_attention_heads, cfg.head_dim),
            k.reshape(*shape, cfg.num_key_value_heads, cfg.head_dim),
            v.reshape(*shape, cfg.num_key_value_heads, cfg.head_dim))
