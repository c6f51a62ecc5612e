"""An independent float64 NumPy oracle of the loop math (loop-architecture.md section 3), for tests only.

Written from the spec, sharing no code with ``trtllm_loop``: full-sequence only, explicit loops, and knobs to
apply the known bugs of other implementations (so tests can show a case is sensitive to them). It is checked
against the shared golden logits in ``test_golden.py`` before it is trusted for new cases.
"""
from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):  # x [T, H, D], rotate-half
    D = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    ang = pos[:, None] * inv[None]  # [T, D/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., :D // 2], x[..., D // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def _attn(q, k, v, allowed):  # q [T,H,D], k/v [T,Hkv,D], allowed [T,T]
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    out = np.zeros_like(q)
    for h in range(H):
        kh = h // (H // Hkv)
        s = q[:, h] @ k[:, kh].T / np.sqrt(D)
        s = np.where(allowed, s, -np.inf)
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
        out[:, h] = p @ v[:, kh]
    return out


def forward(cfg: dict, w: dict, ids: list[int], window: int | None = None, gate_pre_rope: bool = False,
            global_from_loop1: bool = False, gate_override: float | None = None) -> np.ndarray:
    """Logits [T, V] in float64. ``w``: HF tensor names -> float64 arrays."""
    L, H, Hkv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    W = cfg["loop_window_size"] if window is None else window
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    j, i = np.meshgrid(np.arange(T), np.arange(T))
    causal = j <= i
    local = causal & (j > i - W)
    x = w["model.embed_tokens.weight"][ids]

    def layer_qkv(l, h):
        a = _rms(h, w[f"model.layers.{l}.input_layernorm.weight"], eps)
        p = f"model.layers.{l}.self_attn."
        q = (a @ w[p + "q_proj.weight"].T).reshape(T, H, D)
        k = (a @ w[p + "k_proj.weight"].T).reshape(T, Hkv, D)
        v = (a @ w[p + "v_proj.weight"].T).reshape(T, Hkv, D)
        return q, _rope(q, pos, theta), _rope(k, pos, theta), v

    def finish(l, h, o):
        p = f"model.layers.{l}."
        h = h + o.reshape(T, H * D) @ w[p + "self_attn.o_proj.weight"].T
        a = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
        g = a @ w[p + "mlp.gate_proj.weight"].T
        u = a @ w[p + "mlp.up_proj.weight"].T
        return h + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T

    kv0 = []
    h = x
    for l in range(L):
        _, q, k, v = layer_qkv(l, h)
        kv0.append((k, v))
        h = finish(l, h, _attn(q, k, v, causal))
    for l in range(L):
        q_pre, q, k, v = layer_qkv(l, h)
        gq = q_pre if gate_pre_rope else q
        wg, bg = w[f"model.gate_projections.{l}.weight"], w[f"model.gate_projections.{l}.bias"]
        g = 1 / (1 + np.exp(-(np.einsum("thd,hd->th", gq, wg) + bg)))[..., None]
        if gate_override is not None:
            g = np.full_like(g, gate_override)
        kg, vg = (k, v) if global_from_loop1 else kv0[l]
        A = _attn(q, kg, vg, causal)
        B = _attn(q, k, v, local)
        h = finish(l, h, g * A + (1 - g) * B)
    h = _rms(h, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return h @ head.T
