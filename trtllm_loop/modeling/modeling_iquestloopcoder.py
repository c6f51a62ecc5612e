"""IQuestLoopCoder as a transformers ``PreTrainedModel`` + ``GenerationMixin`` (no remote code).

Module attributes carry the released checkpoint names, so ``from_pretrained`` loads the 883 tensors with no
map: ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``model.layers.{i}.mlp.*``,
``model.layers.{i}.{input,post_attention}_layernorm``, ``model.gate_projections.{i}.{weight,bias}``,
``model.norm``, ``lm_head``. The forward is :func:`trtllm_loop.modeling.loop.loop_forward` with a contiguous
attention backend over :class:`LoopCache`.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from trtllm_loop.modeling.configuration import IQuestLoopCoderConfig
from trtllm_loop.modeling.loop import loop_forward
from trtllm_loop.modeling.ops import apply_rope, attention_core, gate, rms_norm, rope_cos_sin, split_qkv, window_mask

DEBUG = os.environ.get("TRTLLM_LOOP_DEBUG", "0") not in ("", "0")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GateProjection(nn.Module):
    """Per-head loop gate: weight ``[H, D]`` (row h dots head h's post-RoPE query), bias ``[H]``."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads))

    def forward(self, q_rot: torch.Tensor) -> torch.Tensor:
        """q_rot ``[..., H, D]`` (post-RoPE pass-2 query) -> g ``[..., H, 1]``."""
        return gate(q_rot, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, Hkv, D, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(hd, H * D, bias=False)
        self.k_proj = nn.Linear(hd, Hkv * D, bias=False)
        self.v_proj = nn.Linear(hd, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, hd, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    """The layer protocol of :func:`~trtllm_loop.modeling.loop.loop_forward`: ``qkv`` and ``finish``."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def qkv(self, h: torch.Tensor) -> torch.Tensor:
        """Fused pre-RoPE ``q|k|v`` of the input norm of h."""
        a, attn = self.input_layernorm(h), self.self_attn
        return torch.cat([attn.q_proj(a), attn.k_proj(a), attn.v_proj(a)], dim=-1)

    def finish(self, h: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Residual + o_proj of the token-major head concat, then the SwiGLU MLP block."""
        h = h + self.self_attn.o_proj(heads.flatten(-2))
        a, mlp = self.post_attention_layernorm(h), self.mlp
        return h + mlp.down_proj(F.silu(mlp.gate_proj(a)) * mlp.up_proj(a))


class LoopCache:
    """Decode state of a batch: per layer the full pass-1 K/V and a ring of the last W pass-2 K/V.

    Tensors are post-RoPE, ``[B, T, Hkv, D]``. ``k1[l]`` grows with the sequence; ``k2[l]`` never holds more
    than the window slot's W tokens (the oldest is dropped when a new one arrives), which is all pass 2 reads.
    """

    is_compileable = False  # transformers' generate asks before choosing torch.compile

    def __init__(self, num_layers: int):
        self.k1: list[torch.Tensor | None] = [None] * num_layers
        self.v1: list[torch.Tensor | None] = [None] * num_layers
        self.k2: list[torch.Tensor | None] = [None] * num_layers
        self.v2: list[torch.Tensor | None] = [None] * num_layers
        self.seen = 0  # tokens already processed

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def __len__(self) -> int:
        return len(self.k1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for lst in (self.k1, self.v1, self.k2, self.v2):
            for i, t in enumerate(lst):
                if t is not None:
                    lst[i] = t.index_select(0, beam_idx.to(t.device))


class ContiguousBackend:
    """The attention contract of :mod:`trtllm_loop.modeling.loop` over a :class:`LoopCache` (one step).

    ``key_valid [B, past + T]`` marks real (non-padding) tokens; positions are per-row RoPE positions.
    """

    def __init__(self, cache: LoopCache, cfg, positions: torch.Tensor, key_valid: torch.Tensor | None,
                 dtype: torch.dtype):
        self.cache, self.cfg = cache, cfg
        self.past = cache.seen
        self.T = positions.shape[1]
        self.cos, self.sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)  # [B, T, D]
        self.key_valid = key_valid
        self.q_idx = torch.arange(self.past, self.past + self.T, device=positions.device)

    def rope_q(self, q):
        return apply_rope(q, self.cos, self.sin)

    def attend(self, slot: int, qkv):
        layer, window = slot // 2, self.cfg.slot_window(slot)
        q, k, v = split_qkv(qkv, self.cfg)
        q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        c = self.cache
        if window is None:  # full slot: append at [past, past+T) unless this step already wrote it (re-append)
            stored = c.k1[layer]
            n = 0 if stored is None else stored.shape[1]
            if n == self.past:
                c.k1[layer] = k if stored is None else torch.cat([stored, k], 1)
                c.v1[layer] = v if stored is None else torch.cat([c.v1[layer], v], 1)
            elif n != self.past + self.T:
                raise RuntimeError(f"LoopCache slot {slot} holds {n} tokens, expected {self.past} or "
                                   f"{self.past + self.T}")
            elif DEBUG:
                assert torch.equal(stored[:, self.past:], k) and torch.equal(c.v1[layer][:, self.past:], v), \
                    f"re-append into slot {slot} changed the stored pass-1 K/V"
            keys, vals = c.k1[layer], c.v1[layer]
        else:  # window slot: the ring plus this step's tokens, then keep the last W
            ring_k, ring_v = c.k2[layer], c.v2[layer]
            keys = k if ring_k is None else torch.cat([ring_k, k], 1)
            vals = v if ring_v is None else torch.cat([ring_v, v], 1)
            c.k2[layer], c.v2[layer] = keys[:, -window:], vals[:, -window:]
        k_idx = torch.arange(self.past + self.T - keys.shape[1], self.past + self.T, device=q.device)
        allowed = window_mask(self.q_idx, k_idx, window)[None].expand(q.shape[0], -1, -1)
        if self.key_valid is not None:  # padding: a pad key is never attended, except by itself
            valid = self.key_valid[:, k_idx]
            allowed = allowed & (valid[:, None, :] | (k_idx[None, None, :] == self.q_idx[None, :, None]))
        return attention_core(q, keys, vals, allowed)


class IQuestLoopCoderPreTrainedModel(PreTrainedModel):
    config_class = IQuestLoopCoderConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, GateProjection):
            module.weight.zero_()
            module.bias.zero_()


class IQuestLoopCoderModel(IQuestLoopCoderPreTrainedModel):
    def __init__(self, config: IQuestLoopCoderConfig):
        super().__init__(config)
        self.loop_config = config.to_loop_config()
        c = self.loop_config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.gate_projections = nn.ModuleList(
            GateProjection(c.num_attention_heads, c.head_dim) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, past_key_values: LoopCache | None = None, attention_mask=None,
                position_ids=None, use_cache: bool = True):
        """input_ids ``[B, T]`` (the tokens not yet in the cache) -> (hidden ``[B, T, hidden]``, cache)."""
        c = self.loop_config
        B, T = input_ids.shape
        cache = past_key_values if past_key_values is not None else LoopCache(c.num_hidden_layers)
        past = cache.seen
        key_valid = None
        if attention_mask is not None and attention_mask.dim() == 2:
            if attention_mask.shape[1] != past + T:
                raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns; expected past + new "
                                 f"tokens = {past} + {T}")
            if not bool(attention_mask.all()):
                key_valid = attention_mask.bool()
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        elif attention_mask is not None:
            raise ValueError("only a 2-D [batch, past + new] padding mask is supported as attention_mask")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, -1)
        h = self.embed_tokens(input_ids)
        backend = ContiguousBackend(cache, c, position_ids, key_valid, h.dtype)
        h = loop_forward(self, h, backend, c)
        cache.seen = past + T
        return h, (cache if use_cache else None)


class IQuestLoopCoderForCausalLM(IQuestLoopCoderPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: IQuestLoopCoderConfig):
        super().__init__(config)
        self.model = IQuestLoopCoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new):
        self.lm_head = new

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, labels=None, logits_to_keep: int = 0, return_dict=None, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        h, cache = self.model(input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=use_cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h).float()
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    # --- generation: our own cache object, inputs sliced to the tokens the cache has not seen
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            c = self.model.loop_config
            model_kwargs["past_key_values"] = LoopCache(c.num_hidden_layers)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      use_cache=True, **kwargs):
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.get_seq_length():]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache}
