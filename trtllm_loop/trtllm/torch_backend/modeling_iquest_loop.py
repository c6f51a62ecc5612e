"""IQuest-Coder-V1 Loop for TensorRT-LLM's PyTorch backend (TRT-LLM 1.2.1, ``tensorrt_llm._torch``).

L physical decoder layers built from TRT-LLM modules run twice; the KV cache has 2L layers (the slot plan of
:meth:`trtllm_loop.config.LoopConfig.slot_plan`):

* pass 1 of layer l: fused QKV -> backend on KV layer ``2l`` (full causal, appends K1/V1);
* pass 2 of layer l: fused QKV ->
  - global: a **second** backend object on KV layer ``2l`` fed ``[q2, k1, v1]``: it re-appends the identical
    pass-1 K/V of the step at the same positions (a no-op write) and attends q2 over the full pass-1 cache --
    the only read of another pass's cache the stock kernel allows (``shared/docs/tensorrt-llm.md`` 3.4);
  - local: backend on KV layer ``2l+1`` with ``attention_window_size = loop_window_size``;
  - per-head gate ``sigmoid(<RoPE(q2)_h, Wg_h> + bg_h)`` and mix ``g * global + (1 - g) * local`` in the
    activation dtype (BF16 in production; no ``out_scale``, so no quantized attention output), then ``o_proj``.

The pass-1 K/V of the step wait in a stash preallocated for ``max_num_tokens`` tokens (no allocation, host sync or
data-dependent branch inside ``forward``: the whole step can be captured in a CUDA graph). Tensor parallelism
follows TRT-LLM's ``Mapping``: q heads, KV heads and gate rows split alike (column-parallel QKV, row-parallel
``o_proj`` with all-reduce).

TRT-LLM sources each call follows (release 1.2.1, ``NVIDIA/TensorRT-LLM``):
``tensorrt_llm/_torch/models/modeling_utils.py`` (register_auto_model, DecoderModel, DecoderModelForCausalLM),
``tensorrt_llm/_torch/models/modeling_llama.py`` (layer layout, Embedding/LMHead TP modes),
``tensorrt_llm/_torch/modules/attention.py`` (how Attention composes qkv_proj + create_attention + o_proj),
``tensorrt_llm/_torch/modules/linear.py``, ``embedding.py``, ``rms_norm.py``, ``gated_mlp.py``,
``tensorrt_llm/_torch/attention_backend/{interface,utils,trtllm}.py``, ``tensorrt_llm/_torch/model_config.py``
(``get_layer_types``), ``tensorrt_llm/functional.py`` (PositionEmbeddingType).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from trtllm_loop.trtllm.compat import ensure_tensorrt_llm

ensure_tensorrt_llm()

# tensorrt_llm/_torch/attention_backend/interface.py (1.2.1)
from tensorrt_llm._torch.attention_backend.interface import (PositionalEmbeddingParams,  # noqa: E402
                                                             PredefinedAttentionMask, RopeParams)
# tensorrt_llm/_torch/attention_backend/utils.py (1.2.1)
from tensorrt_llm._torch.attention_backend.utils import create_attention  # noqa: E402
# tensorrt_llm/_torch/model_config.py (1.2.1)
from tensorrt_llm._torch.model_config import ModelConfig  # noqa: E402
# tensorrt_llm/_torch/models/modeling_utils.py (1.2.1)
from tensorrt_llm._torch.models.modeling_utils import (DecoderModel, DecoderModelForCausalLM,  # noqa: E402
                                                       register_auto_model)
# tensorrt_llm/_torch/modules/{embedding,gated_mlp,linear,rms_norm}.py (1.2.1)
from tensorrt_llm._torch.modules.embedding import Embedding  # noqa: E402
from tensorrt_llm._torch.modules.gated_mlp import GatedMLP  # noqa: E402
from tensorrt_llm._torch.modules.linear import (Linear, TensorParallelMode, WeightMode,  # noqa: E402
                                                WeightsLoadingConfig)
from tensorrt_llm._torch.modules.rms_norm import RMSNorm  # noqa: E402
# tensorrt_llm/bindings (C++ LayerType) and tensorrt_llm/functional.py (1.2.1)
from tensorrt_llm.bindings import LayerType  # noqa: E402
from tensorrt_llm.functional import PositionEmbeddingType  # noqa: E402

from trtllm_loop.config import ARCHITECTURE, LoopConfig  # noqa: E402
from trtllm_loop.modeling.loop import apply_rope, compute_gate, mix, rope_cos_sin, rope_inv_freq  # noqa: E402
from trtllm_loop.trtllm.torch_backend.config_view import loop_config_from_view  # noqa: E402

# --- VSWA: TRT-LLM 1.2.1 ModelConfig.get_layer_types() answers only for Gemma3ForCausalLM ("This method is a
# hack"), and the VSWA KV-cache sizing asserts layer_types is set. Every one of our 2L KV layers is attention.
_original_get_layer_types = ModelConfig.get_layer_types


def _get_layer_types(self):
    if self.pretrained_config.architectures[0] == ARCHITECTURE:
        return [LayerType.ATTENTION] * self.pretrained_config.num_hidden_layers
    return _original_get_layer_types(self)


ModelConfig.get_layer_types = _get_layer_types


class LoopGate(nn.Module):
    """``model.gate_projections.{l}``: weight ``[H, D]``, bias ``[H]``, kept in the activation dtype (never
    quantized); rows split across TP ranks like the query heads (TRT-LLM's COLUMN split, ``linear.py``)."""

    def __init__(self, num_heads: int, head_dim: int, mapping, dtype):
        super().__init__()
        self.mapping = mapping
        self.weight = nn.Parameter(torch.empty(num_heads // mapping.tp_size, head_dim, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(num_heads // mapping.tp_size, dtype=dtype), requires_grad=False)

    def load_weights(self, weights: List[Dict]):
        n, r = self.weight.shape[0], self.mapping.tp_rank
        self.weight.data.copy_(weights[0]["weight"][r * n:(r + 1) * n])
        self.bias.data.copy_(weights[0]["bias"][r * n:(r + 1) * n])

    def forward(self, q_rot: torch.Tensor) -> torch.Tensor:
        return compute_gate(q_rot, self.weight, self.bias)


class IQuestLoopAttention(nn.Module):
    """Fused QKV + three attention-backend objects (``attention.py``'s composition, unrolled for the loop)."""

    def __init__(self, model_config: ModelConfig, loop_cfg: LoopConfig, layer_idx: int):
        super().__init__()
        c, mapping, tp = loop_cfg, model_config.mapping, model_config.mapping.tp_size
        dtype = model_config.pretrained_config.torch_dtype
        # attention.py: KV heads per rank round up; with tp > num_key_value_heads the loader replicates them
        self.num_heads, self.num_kv_heads = c.num_attention_heads // tp, -(-c.num_key_value_heads // tp)
        self.head_dim, self.window = c.head_dim, c.loop_window_size
        self.q_size = self.num_heads * c.head_dim
        quant = model_config.get_quant_config()
        skip = model_config.skip_create_weights_in_init
        self.qkv_proj = Linear(c.hidden_size, tp * (self.num_heads + 2 * self.num_kv_heads) * c.head_dim,
                               bias=False, dtype=dtype, mapping=mapping,
                               tensor_parallel_mode=TensorParallelMode.COLUMN,
                               weights_loading_config=WeightsLoadingConfig(weight_mode=WeightMode.FUSED_QKV_LINEAR),
                               quant_config=quant, skip_create_weights_in_init=skip)
        self.o_proj = Linear(c.q_size, c.hidden_size, bias=False, dtype=dtype, mapping=mapping,
                             tensor_parallel_mode=TensorParallelMode.ROW, quant_config=quant,
                             skip_create_weights_in_init=skip)
        self.gate = LoopGate(c.num_attention_heads, c.head_dim, mapping, dtype)
        rope = PositionalEmbeddingParams(type=PositionEmbeddingType.rope_gpt_neox,
                                         rope=RopeParams.from_config(model_config.pretrained_config))

        def backend(kv_layer: int):
            return create_attention(model_config.attn_backend, kv_layer, self.num_heads, c.head_dim,
                                    self.num_kv_heads, pos_embd_params=rope, quant_config=quant)

        self.attn_pass1 = backend(c.pass1_slot(layer_idx))    # appends K1/V1, full causal
        self.attn_global = backend(c.pass1_slot(layer_idx))   # same KV layer: re-append [k1, v1], read q2
        self.attn_local = backend(c.pass2_slot(layer_idx))    # window W

    def forward_pass1(self, hidden: torch.Tensor, attn_metadata, stash: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        stash[:qkv.shape[0]].copy_(qkv[:, self.q_size:])  # pre-RoPE k1|v1 of this step
        out = self.attn_pass1.forward(qkv, None, None, attn_metadata,
                                      attention_mask=PredefinedAttentionMask.CAUSAL)
        return self.o_proj(out)

    def forward_pass2(self, hidden: torch.Tensor, attn_metadata, stash: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        q = qkv[:, :self.q_size]
        gate = self.gate(apply_rope(q.view(n, self.num_heads, self.head_dim), cos, sin))
        glob = self.attn_global.forward(torch.cat([q, stash[:n]], dim=-1), None, None, attn_metadata,
                                        attention_mask=PredefinedAttentionMask.CAUSAL)
        local = self.attn_local.forward(qkv, None, None, attn_metadata,
                                        attention_mask=PredefinedAttentionMask.CAUSAL,
                                        attention_window_size=self.window)
        shape = (n, self.num_heads, self.head_dim)
        return self.o_proj(mix(gate, glob.view(shape), local.view(shape)).reshape(n, self.q_size))


class IQuestLoopDecoderLayer(nn.Module):

    def __init__(self, model_config: ModelConfig, loop_cfg: LoopConfig, layer_idx: int):
        super().__init__()
        dtype = model_config.pretrained_config.torch_dtype
        self.input_layernorm = RMSNorm(hidden_size=loop_cfg.hidden_size, eps=loop_cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = IQuestLoopAttention(model_config, loop_cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(hidden_size=loop_cfg.hidden_size, eps=loop_cfg.rms_norm_eps,
                                                dtype=dtype)
        self.mlp = GatedMLP(hidden_size=loop_cfg.hidden_size, intermediate_size=loop_cfg.intermediate_size,
                            bias=False, dtype=dtype, config=model_config, layer_idx=layer_idx)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_pass1(self, h, attn_metadata, stash):
        return self._mlp(h + self.self_attn.forward_pass1(self.input_layernorm(h), attn_metadata, stash))

    def forward_pass2(self, h, attn_metadata, stash, cos, sin):
        return self._mlp(h + self.self_attn.forward_pass2(self.input_layernorm(h), attn_metadata, stash, cos, sin))


class IQuestLoopModel(DecoderModel):

    def __init__(self, model_config: ModelConfig):
        super().__init__(model_config)
        mapping = model_config.mapping
        if mapping.pp_size != 1 or getattr(mapping, "enable_attention_dp", False):
            # DecoderModel.__pp_init__ would split num_hidden_layers (the 2L KV layers) over our L modules
            raise ValueError("IQuestLoopCoderForCausalLM supports tensor parallelism only (pipeline_parallel_size 1, "
                             "no attention DP): both passes run every layer, so a PP stage would wait for the others")
        cfg = loop_config_from_view(model_config.pretrained_config)
        self.loop_cfg = cfg
        dtype = model_config.pretrained_config.torch_dtype
        tp = model_config.mapping.tp_size
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, mapping=model_config.mapping,
                                      tensor_parallel_mode=TensorParallelMode.COLUMN, gather_output=True)
        self.layers = nn.ModuleList(IQuestLoopDecoderLayer(model_config, cfg, l)
                                    for l in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(hidden_size=cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        # pass-1 k|v of every layer for the tokens of one step (2 * KV heads per rank * head_dim per token and layer)
        kv_per_rank = -(-cfg.num_key_value_heads // tp) * cfg.head_dim
        self.register_buffer("kv_stash", torch.zeros(cfg.num_hidden_layers, model_config.max_num_tokens,
                                                     2 * kv_per_rank, dtype=dtype), persistent=False)
        # RoPE frequencies for trtllm_loop.modeling.loop.rope_cos_sin, resident on the model's device: building
        # them in forward would copy host memory to the GPU, which CUDA-graph capture does not allow
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)

    def rope_tables(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos/sin ``[N, head_dim]`` (rotate-half layout) of the step's positions, for the gate's RoPE of q2."""
        return rope_cos_sin(position_ids.reshape(-1), self.loop_cfg.head_dim, self.loop_cfg.rope_theta, dtype,
                            inv_freq=self.rope_inv_freq)

    def forward(self, attn_metadata, input_ids: torch.Tensor = None, position_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, lora_params=None, **kwargs) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rope_tables(position_ids, h.dtype)
        for l, layer in enumerate(self.layers):
            h = layer.forward_pass1(h, attn_metadata, self.kv_stash[l])
        for l, layer in enumerate(self.layers):
            h = layer.forward_pass2(h, attn_metadata, self.kv_stash[l], cos, sin)
        return self.norm(h)


@register_auto_model(ARCHITECTURE)
class IQuestLoopCoderForCausalLM(DecoderModelForCausalLM[IQuestLoopModel, object]):

    def __init__(self, model_config: ModelConfig):
        model = IQuestLoopModel(model_config)
        super().__init__(model, config=model_config, hidden_size=model.loop_cfg.hidden_size,
                         vocab_size=model.loop_cfg.vocab_size)

    def load_weights(self, weights: Dict, weight_mapper=None, skip_modules: List[str] = []):
        """HF names -> module names: the loop gates move under their layer's attention; the rest (q/k/v ->
        qkv_proj, gate/up -> gate_up_proj, TP slicing, NVFP4/FP8 tensors) is TRT-LLM's generic loader."""
        renamed = {}
        for name, t in weights.items():
            if name.startswith("model.gate_projections."):
                _, _, layer, leaf = name.split(".")
                name = f"model.layers.{layer}.self_attn.gate.{leaf}"
            renamed[name] = t
        super().load_weights(renamed, weight_mapper=weight_mapper, skip_modules=skip_modules)
