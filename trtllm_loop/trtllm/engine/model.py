"""IQuest-Coder-V1 Loop as a TensorRT-LLM 1.2.x **engine-flow** model definition (``tensorrt_llm.models``).

L decoder blocks whose ``Parameter``s serve both loop passes (a Parameter read twice is one weight in the
engine), run by the project's one loop schedule (:func:`trtllm_loop.modeling.loop.loop_forward`): the blocks
implement its layer protocol (``qkv``, ``finish``), :class:`EngineSlotBackend` maps ``attend(slot, qkv)`` onto
``gpt_attention(layer_idx=slot)`` -- each call its own GPTAttention plugin instance (``layer_idx`` is a plugin
field, ``tensorrt_llm/functional.py``) over KV layer ``slot`` of the 2L the config declares:

* ``2l``: pass 1 appends K1/V1; the pass-2 global call feeds ``[q2, k1, v1]`` to the same KV layer (the plugin
  always appends -- the identical re-append is the design -- and attends q2 over the full pass-1 cache);
* ``2l+1``: pass 2 local, with the window the runtime gives that layer (``max_attention_window`` =
  ``<max_seq_len>,<W>`` repeated; ``host_max_attention_window_sizes[layer_idx]`` inside the plugin).

The gate and mix are either plain functional ops (the reference, the default) or the loop gate plugin
(``config.loop_gate_plugin``, :mod:`.gate_plugin`). Layout and names follow TRT-LLM's Llama
(``tensorrt_llm/models/llama/model.py``: ``transformer.vocab_embedding``, ``layers.{l}.input_layernorm``,
``attention.qkv`` (``ColumnLinear`` fused, ``gather_output=False``), ``attention.dense`` (``RowLinear``),
``post_layernorm``, ``mlp.fc`` (SiLU branch, HF ``gate_proj``), ``mlp.gate`` (HF ``up_proj``), ``mlp.proj``,
``transformer.ln_f``, ``lm_head``) plus ``transformer.gate_projections.{l}`` (never quantized). The blocks
are looped here, not in ``DecoderLayerList`` (it would pair 2L KV inputs with 2L layers); EAGLE's engine-flow
model is the precedent for more KV layers than decoder blocks. Attention is composed from ``ColumnLinear`` +
``gpt_attention`` + ``RowLinear`` the way ``tensorrt_llm/layers/attention.py`` ``Attention.forward`` does (its
forward has no hook for a second call on another KV layer).
"""
from __future__ import annotations

import torch

from trtllm_loop.trtllm.compat import ensure_tensorrt_llm

ensure_tensorrt_llm()

from tensorrt_llm._common import default_net  # noqa: E402
from tensorrt_llm.functional import (AttentionMaskType, PositionEmbeddingType, RopeEmbeddingUtils,  # noqa: E402
                                     concat, embedding, gather_last_token_logits, gpt_attention, rms_norm, shape,
                                     sigmoid, silu, split, sum, unsqueeze)
from tensorrt_llm.layers import ColumnLinear, RowLinear  # noqa: E402
from tensorrt_llm.models import MODEL_MAP  # noqa: E402
from tensorrt_llm.models.modeling_utils import PretrainedConfig, PretrainedModel  # noqa: E402
from tensorrt_llm.module import Module, ModuleList  # noqa: E402
from tensorrt_llm.parameter import Parameter  # noqa: E402

from trtllm_loop.config import ARCHITECTURE  # noqa: E402
from trtllm_loop.modeling.loop import loop_forward  # noqa: E402
from trtllm_loop.modeling.ops import rope_cos_sin  # noqa: E402
from trtllm_loop.trtllm.engine.config import loop_config_of  # noqa: E402


class IQuestLoopEngineConfig(PretrainedConfig):
    """The checkpoint config (:func:`~trtllm_loop.trtllm.engine.config.checkpoint_config`); extra keys
    (``num_unique_layers``, ``loop_window_size``, ``loop_gate_plugin`` ...) become attributes."""

    def loop_config(self):
        return loop_config_of(self)


class FunctionalGlue:
    """:class:`trtllm_loop.modeling.loop.TorchGlue` in functional ops (no indexing on network tensors)."""

    @staticmethod
    def split_q(qkv, q_size: int):
        q, kv = split(qkv, [q_size, qkv.shape[-1] - q_size], dim=-1)
        return q, kv

    @staticmethod
    def join(q, kv):
        return concat([q, kv], dim=-1)

    @staticmethod
    def heads(q, num_heads: int, head_dim: int):
        return q.view(concat([shape(q, 0), num_heads, head_dim]))


class Norm(Module):
    def __init__(self, hidden_size: int, eps: float, dtype: str):
        super().__init__()
        self.weight, self.eps, self.hidden_size = Parameter(shape=(hidden_size,), dtype=dtype), eps, hidden_size

    def forward(self, x):
        return rms_norm(x, self.hidden_size, weight=self.weight.value, eps=self.eps)


class LoopGate(Module):
    """``transformer.gate_projections.{l}``: weight ``[H, D]``, bias ``[H]`` (this rank's heads)."""

    def __init__(self, num_heads: int, head_dim: int, dtype: str):
        super().__init__()
        self.weight = Parameter(shape=(num_heads, head_dim), dtype=dtype)
        self.bias = Parameter(shape=(num_heads,), dtype=dtype)

    def forward(self, q_rot):
        return unsqueeze(sigmoid(sum(q_rot * self.weight.value, dim=-1) + self.bias.value), -1)


class Attention(Module):
    def __init__(self, c, rank_c, dtype, mapping):
        super().__init__()
        tp, group = mapping.tp_size, mapping.tp_group
        H, Hkv, D = rank_c.num_attention_heads, rank_c.num_key_value_heads, c.head_dim
        self.qkv = ColumnLinear(c.hidden_size, tp * (H + 2 * Hkv) * D, bias=False, dtype=dtype, tp_group=group,
                                tp_size=tp, gather_output=False, is_qkv=True)
        self.dense = RowLinear(tp * H * D, c.hidden_size, bias=False, dtype=dtype, tp_group=group, tp_size=tp)


class MLP(Module):
    def __init__(self, c, dtype, mapping):
        super().__init__()
        tp, group = mapping.tp_size, mapping.tp_group
        self.fc = ColumnLinear(c.hidden_size, c.intermediate_size, bias=False, dtype=dtype, tp_group=group,
                               tp_size=tp, gather_output=False)
        self.gate = ColumnLinear(c.hidden_size, c.intermediate_size, bias=False, dtype=dtype, tp_group=group,
                                 tp_size=tp, gather_output=False)
        self.proj = RowLinear(c.intermediate_size, c.hidden_size, bias=False, dtype=dtype, tp_group=group, tp_size=tp)

    def forward(self, x):
        return self.proj(silu(self.fc(x)) * self.gate(x))


class LoopDecoderLayer(Module):
    """One decoder block in the layer protocol of :func:`loop_forward`."""

    def __init__(self, c, rank_c, dtype, mapping):
        super().__init__()
        self.rank_c = rank_c
        self.input_layernorm = Norm(c.hidden_size, c.rms_norm_eps, dtype)
        self.attention = Attention(c, rank_c, dtype, mapping)
        self.post_layernorm = Norm(c.hidden_size, c.rms_norm_eps, dtype)
        self.mlp = MLP(c, dtype, mapping)

    def qkv(self, h):
        return self.attention.qkv(self.input_layernorm(h))

    def finish(self, h, heads):
        h = h + self.attention.dense(heads.view(concat([shape(heads, 0), self.rank_c.q_size])))
        return h + self.mlp(self.post_layernorm(h))


class LoopTransformer(Module):
    def __init__(self, c, rank_c, dtype, mapping):
        super().__init__()
        self.vocab_embedding = Module()
        self.vocab_embedding.weight = Parameter(shape=(c.vocab_size, c.hidden_size), dtype=dtype)
        self.layers = ModuleList([LoopDecoderLayer(c, rank_c, dtype, mapping) for _ in range(c.num_hidden_layers)])
        self.gate_projections = ModuleList([LoopGate(rank_c.num_attention_heads, c.head_dim, dtype)
                                            for _ in range(c.num_hidden_layers)])
        self.ln_f = Norm(c.hidden_size, c.rms_norm_eps, dtype)

    def norm(self, h):  # loop_forward's final norm
        return self.ln_f(h)


class EngineSlotBackend:
    """The attention contract of :func:`loop_forward` on ``gpt_attention``: ``attend(slot, qkv)`` is one
    GPTAttention plugin call with ``layer_idx = slot`` (its window is the runtime's for that KV layer)."""

    glue = FunctionalGlue

    def __init__(self, model: "IQuestLoopEngineForCausalLM", position_ids, kv, attn):
        self.m, self.position_ids, self.kv, self.attn = model, position_ids, kv, attn
        if model.config.loop_gate_plugin:
            self.gated_mix = self._gated_mix_plugin

    def attend(self, slot: int, qkv):
        m, c, kv, attn = self.m, self.m.rank_cfg, self.kv, self.attn
        mapping = m.config.mapping
        context, _ = gpt_attention(
            qkv=qkv, past_key_value=kv.get_first_past_key_value(), sequence_length=attn.sequence_length,
            host_past_key_value_lengths=kv.host_past_key_value_lengths,
            host_max_attention_window_sizes=kv.host_max_attention_window_sizes,
            host_sink_token_length=kv.host_sink_token_length, context_lengths=attn.context_lengths,
            cache_indirection=kv.cache_indirection, host_request_types=attn.host_request_types, layer_idx=slot,
            num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            num_kv_heads_origin=m.loop_cfg.num_key_value_heads, hidden_size_per_head=c.head_dim, q_scaling=1.0,
            rotary_embedding_dim=c.head_dim, rotary_embedding_base=c.rope_theta,
            rotary_embedding_max_positions=c.max_position_embeddings,
            position_embedding_type=PositionEmbeddingType.rope_gpt_neox,
            rotary_inv_freq=m.rotary_inv_freq.value, rotary_cos_sin=m.embed_positions_for_gpt_attention.value,
            max_context_length=attn.max_context_length, mask_type=AttentionMaskType.causal,
            tp_size=mapping.tp_size, tp_rank=mapping.tp_rank, kv_cache_block_offsets=kv.kv_cache_block_offsets,
            host_kv_cache_block_offsets=kv.host_kv_cache_block_offsets,
            host_kv_cache_pool_pointers=kv.host_kv_cache_pool_pointers,
            host_kv_cache_pool_mapping=kv.host_kv_cache_pool_mapping,
            host_context_lengths=attn.host_context_lengths, use_cache=True)
        return FunctionalGlue.heads(context, c.num_attention_heads, c.head_dim)

    def rope_q(self, q):
        """NeoX RoPE of ``q [N, H, D]`` at the step's positions: cos/sin rows gathered from the model's tables."""
        cos = unsqueeze(embedding(self.position_ids, self.m.rope_cos.value), 1)
        sin = unsqueeze(embedding(self.position_ids, self.m.rope_sin.value), 1)
        x1, x2 = split(q, q.shape[-1] // 2, dim=-1)
        return q * cos + concat([x2 * -1.0, x1], dim=-1) * sin

    def _gated_mix_plugin(self, gate_projection, q, global_out, local_out):
        from trtllm_loop.trtllm.engine.gate_plugin import gate_mix_plugin

        c = self.m.rank_cfg
        return gate_mix_plugin(q, self.position_ids, global_out, local_out, gate_projection.weight.value,
                               gate_projection.bias.value, num_heads=c.num_attention_heads, head_dim=c.head_dim,
                               rope_theta=c.rope_theta)


class IQuestLoopEngineForCausalLM(PretrainedModel):
    config_class = IQuestLoopEngineConfig

    def __init__(self, config: IQuestLoopEngineConfig):
        super().__init__(config)
        if config.mapping.pp_size != 1:
            raise ValueError("IQuestLoopCoderForCausalLM supports tensor parallelism only (pp_size 1): both passes "
                             "run every block, so a pipeline stage would wait for the others")
        if not hasattr(config, "loop_gate_plugin"):
            config.loop_gate_plugin = False
        c = loop_config_of(config)
        self.loop_cfg, self.rank_cfg = c, c.per_rank(config.mapping.tp_size)
        dtype, tp = config.dtype, config.mapping.tp_size
        self.vocab_padded = -(-c.vocab_size // tp) * tp
        self.transformer = LoopTransformer(c, self.rank_cfg, dtype, config.mapping)
        self.lm_head = ColumnLinear(c.hidden_size, self.vocab_padded, bias=False, dtype=dtype,
                                    tp_group=config.mapping.tp_group, tp_size=tp, gather_output=True)
        # constant tables, computed, not loaded (Attention.create_attention_const_params registers the same two)
        inv_freq, cos_sin = RopeEmbeddingUtils.create_sinusoidal_positions_for_attention_plugin(
            c.max_position_embeddings, c.head_dim, c.rope_theta)
        self.rotary_inv_freq = Parameter(inv_freq, dtype="float32", is_buffer=True)
        self.embed_positions_for_gpt_attention = Parameter(cos_sin, dtype="float32", is_buffer=True)
        # the gate's RoPE tables, from ops.rope_cos_sin: the functional gate is the reference's math
        cos, sin = rope_cos_sin(torch.arange(c.max_position_embeddings), c.head_dim, c.rope_theta,
                                getattr(torch, dtype))
        self.rope_cos = Parameter(cos, dtype=dtype, is_buffer=True)
        self.rope_sin = Parameter(sin, dtype=dtype, is_buffer=True)

    def forward(self, input_ids, position_ids=None, use_cache=False, last_token_ids=None, attention_mask=None,
                kv_cache_params=None, attention_params=None, hidden_states=None, prompt_embedding_table=None,
                prompt_tasks=None, prompt_vocab_size=None, lora_params=None, spec_decoding_params=None):
        if not use_cache:
            raise ValueError("the Loop model needs the KV cache (use_cache): pass 2 reads the pass-1 K/V")
        h = embedding(input_ids, self.transformer.vocab_embedding.weight.value)
        backend = EngineSlotBackend(self, position_ids, kv_cache_params, attention_params)
        h = loop_forward(self.transformer, h, backend, self.rank_cfg)
        h = gather_last_token_logits(h, last_token_ids, default_net().plugin_config.remove_input_padding)
        logits = self.lm_head(h)
        logits.mark_output('logits', self.config.logits_dtype)
        return logits


MODEL_MAP[ARCHITECTURE] = IQuestLoopEngineForCausalLM
