"""IQuest-Coder-V1 Loop for TensorRT-LLM's PyTorch backend (TRT-LLM 1.2.1, ``tensorrt_llm._torch``).

L physical decoder layers built from TRT-LLM modules, run by the project's one loop schedule
(:func:`trtllm_loop.modeling.loop.loop_forward`): the layers implement its layer protocol (``qkv``, ``finish``)
and :class:`TrtllmSlotBackend` maps its ``attend(slot, qkv)`` calls onto TRT-LLM attention objects, one per KV
slot of the 2L slot plan (:meth:`trtllm_loop.config.LoopConfig.slot_plan`):

* slot ``2l`` (full causal): pass 1 appends K1/V1; the pass-2 global call feeds ``[q2, k1, v1]`` to the same op,
  which re-appends the identical pass-1 K/V at the same positions (a no-op write) and attends q2 over the full
  pass-1 cache -- the only read of another pass's cache the stock kernel allows (``shared/docs/tensorrt-llm.md``
  3.4);
* slot ``2l+1``: pass 2 local, ``attention_window_size = loop_window_size``.

The gate ``sigmoid(<RoPE(q2)_h, Wg_h> + bg_h)`` and the mix run as one op where it is built, the gate plugin's
kernel ``torch.ops.trtllm_loop.gate_mix`` (``plugins/loop_gate/``, ``make plugins``; fp32 arithmetic on BF16 I/O),
else as the plain torch ops of :mod:`trtllm_loop.modeling.ops` in the activation dtype (BF16 in production; no
``out_scale``, so no quantized attention output). ``$TRTLLM_LOOP_FUSED_GATE`` chooses: ``auto`` (default: the op
where it has a kernel for the model's device), ``0`` (the plain torch ops, the reference), ``1`` (the op, or an
error). The pass-1 K/V of the step wait in a stash preallocated for
``max_num_tokens`` tokens (:class:`~trtllm_loop.modeling.loop.BufferStash`; no allocation, host sync or
data-dependent branch inside ``forward``: the whole step can be captured in a CUDA graph). Tensor parallelism
follows TRT-LLM's ``Mapping``: q heads, KV heads and gate rows split alike (column-parallel QKV, row-parallel
``o_proj`` with all-reduce); the schedule runs on the rank's head layout (:meth:`LoopConfig.per_rank`).

TRT-LLM sources each call follows (release 1.2.1, ``NVIDIA/TensorRT-LLM``):
``tensorrt_llm/_torch/models/modeling_utils.py`` (register_auto_model, DecoderModel, DecoderModelForCausalLM),
``tensorrt_llm/_torch/models/modeling_llama.py`` (layer layout, Embedding/LMHead TP modes),
``tensorrt_llm/_torch/modules/attention.py`` (how Attention composes qkv_proj + create_attention + o_proj),
``tensorrt_llm/_torch/modules/linear.py``, ``embedding.py``, ``rms_norm.py``, ``gated_mlp.py``,
``tensorrt_llm/_torch/attention_backend/{interface,utils,trtllm}.py``, ``tensorrt_llm/_torch/model_config.py``
(``get_layer_types``), ``tensorrt_llm/functional.py`` (PositionEmbeddingType).
"""
from __future__ import annotations

import os
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
from trtllm_loop.kernels.gate_mix import op_available  # noqa: E402
from trtllm_loop.modeling.loop import BufferStash, loop_forward  # noqa: E402
from trtllm_loop.modeling.ops import apply_rope, gate, rope_cos_sin, rope_inv_freq  # noqa: E402
from trtllm_loop.trtllm.torch_backend.config_view import loop_config_from_view  # noqa: E402

# --- VSWA: TRT-LLM 1.2.1 ModelConfig.get_layer_types() answers only for Gemma3ForCausalLM ("This method is a
# hack"), and the VSWA KV-cache sizing asserts layer_types is set. Every one of our 2L KV layers is attention.
_original_get_layer_types = ModelConfig.get_layer_types


def _get_layer_types(self):
    if self.pretrained_config.architectures[0] == ARCHITECTURE:
        return [LayerType.ATTENTION] * self.pretrained_config.num_hidden_layers
    return _original_get_layer_types(self)


ModelConfig.get_layer_types = _get_layer_types


class TrtllmGateProjection(nn.Module):
    """``model.gate_projections.{l}`` (the checkpoint's name, so TRT-LLM's generic loader finds it): the loop gate,
    weight ``[H, D]``, bias ``[H]``, kept in the activation dtype (never quantized); rows split across TP ranks
    like the query heads (TRT-LLM's COLUMN split, ``linear.py``)."""

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
        return gate(q_rot, self.weight, self.bias)


class TrtllmLoopAttention(nn.Module):
    """Fused QKV, ``o_proj`` and one attention-backend object per KV slot of the layer (``attention.py``'s
    composition, without its forward: :func:`loop_forward` orders the calls)."""

    def __init__(self, model_config: ModelConfig, loop_cfg: LoopConfig, rank_cfg: LoopConfig, layer_idx: int):
        super().__init__()
        c, mapping, tp = loop_cfg, model_config.mapping, model_config.mapping.tp_size
        dtype = model_config.pretrained_config.torch_dtype
        quant = model_config.get_quant_config()
        skip = model_config.skip_create_weights_in_init
        # attention.py: KV heads per rank round up; with tp > num_key_value_heads the loader replicates them
        H, Hkv = rank_cfg.num_attention_heads, rank_cfg.num_key_value_heads
        self.qkv_proj = Linear(c.hidden_size, tp * (H + 2 * Hkv) * c.head_dim,
                               bias=False, dtype=dtype, mapping=mapping,
                               tensor_parallel_mode=TensorParallelMode.COLUMN,
                               weights_loading_config=WeightsLoadingConfig(weight_mode=WeightMode.FUSED_QKV_LINEAR),
                               quant_config=quant, skip_create_weights_in_init=skip)
        self.o_proj = Linear(c.q_size, c.hidden_size, bias=False, dtype=dtype, mapping=mapping,
                             tensor_parallel_mode=TensorParallelMode.ROW, quant_config=quant,
                             skip_create_weights_in_init=skip)
        rope = PositionalEmbeddingParams(type=PositionEmbeddingType.rope_gpt_neox,
                                         rope=RopeParams.from_config(model_config.pretrained_config))
        # slot 2l: pass 1 appends K1/V1 and the pass-2 global call re-appends them (same KV layer, same op);
        # slot 2l+1: pass 2 local, window W
        self.slot_attention = {
            slot: create_attention(model_config.attn_backend, slot, H, c.head_dim, Hkv, pos_embd_params=rope,
                                   quant_config=quant)
            for slot in (c.pass1_slot(layer_idx), c.pass2_slot(layer_idx))}


class TrtllmLoopDecoderLayer(nn.Module):
    """TRT-LLM modules in the layer protocol of :func:`loop_forward` (``qkv``, ``finish``)."""

    def __init__(self, model_config: ModelConfig, loop_cfg: LoopConfig, rank_cfg: LoopConfig, layer_idx: int):
        super().__init__()
        dtype = model_config.pretrained_config.torch_dtype
        self.input_layernorm = RMSNorm(hidden_size=loop_cfg.hidden_size, eps=loop_cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = TrtllmLoopAttention(model_config, loop_cfg, rank_cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(hidden_size=loop_cfg.hidden_size, eps=loop_cfg.rms_norm_eps,
                                                dtype=dtype)
        self.mlp = GatedMLP(hidden_size=loop_cfg.hidden_size, intermediate_size=loop_cfg.intermediate_size,
                            bias=False, dtype=dtype, config=model_config, layer_idx=layer_idx)

    def qkv(self, h: torch.Tensor) -> torch.Tensor:
        return self.self_attn.qkv_proj(self.input_layernorm(h))

    def finish(self, h: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn.o_proj(heads.flatten(-2))
        return h + self.mlp(self.post_attention_layernorm(h))


class TrtllmSlotBackend:
    """The attention contract of :func:`loop_forward` on TRT-LLM attention objects: ``attend(slot, qkv)`` calls
    the slot's object with the fused qkv ``[N, (H + 2 Hkv) * D]`` and the slot's window from the slot plan
    (``attention_window_size`` only where the slot has one: TRT-LLM's "full" is its default)."""

    def __init__(self, slot_attention: dict, rank_cfg: LoopConfig, attn_metadata, cos: torch.Tensor,
                 sin: torch.Tensor):
        self.slot_attention, self.cfg, self.metadata = slot_attention, rank_cfg, attn_metadata
        self.cos, self.sin = cos, sin

    def rope_q(self, q: torch.Tensor) -> torch.Tensor:
        return apply_rope(q, self.cos, self.sin)

    def attend(self, slot: int, qkv: torch.Tensor) -> torch.Tensor:
        window = self.cfg.slot_window(slot)
        extra = {} if window is None else {"attention_window_size": window}
        # enable_attn_nvfp4_output=False: with NVFP4 weights TrtllmAttention.forward would otherwise return
        # (NVFP4 output, scale factors); the gate mix needs the output in the activation dtype (trtllm.py)
        out = self.slot_attention[slot].forward(qkv, None, None, self.metadata,
                                                attention_mask=PredefinedAttentionMask.CAUSAL,
                                                enable_attn_nvfp4_output=False, **extra)
        return out.view(qkv.shape[0], self.cfg.num_attention_heads, self.cfg.head_dim)


class TrtllmFusedGateBackend(TrtllmSlotBackend):
    """:class:`TrtllmSlotBackend` with pass 2's RoPE of q2, gate and mix fused into one op (``gated_mix``, which
    :func:`~trtllm_loop.modeling.loop.gated_mix` prefers): one kernel per layer instead of about a dozen."""

    def __init__(self, slot_attention: dict, rank_cfg: LoopConfig, attn_metadata, positions: torch.Tensor,
                 rope_theta: float):
        super().__init__(slot_attention, rank_cfg, attn_metadata, None, None)
        self.positions, self.rope_theta = positions, rope_theta

    def gated_mix(self, gate_projection: TrtllmGateProjection, q: torch.Tensor, global_out: torch.Tensor,
                  local_out: torch.Tensor) -> torch.Tensor:
        return torch.ops.trtllm_loop.gate_mix(q, self.positions, global_out, local_out, gate_projection.weight,
                                              gate_projection.bias, self.rope_theta)


FUSED_GATE_ENV = "TRTLLM_LOOP_FUSED_GATE"
FUSED_GATE_MODES = ("auto", "0", "1")


class TrtllmLoopModel(DecoderModel):

    def __init__(self, model_config: ModelConfig):
        super().__init__(model_config)
        mapping = model_config.mapping
        if mapping.pp_size != 1 or getattr(mapping, "enable_attention_dp", False):
            # DecoderModel.__pp_init__ would split num_hidden_layers (the 2L KV layers) over our L modules
            raise ValueError("IQuestLoopCoderForCausalLM supports tensor parallelism only (pipeline_parallel_size 1, "
                             "no attention DP): both passes run every layer, so a PP stage would wait for the others")
        self.fused_gate = os.environ.get(FUSED_GATE_ENV, "auto").strip().lower() or "auto"
        if self.fused_gate not in FUSED_GATE_MODES:
            raise ValueError(f"{FUSED_GATE_ENV}={self.fused_gate!r}: use auto (the gate op where it is built), 0 (the "
                             "plain torch ops) or 1 (the gate op, required)")
        cfg = loop_config_from_view(model_config.pretrained_config)
        self.loop_cfg, self.rank_cfg = cfg, cfg.per_rank(mapping.tp_size)
        dtype = model_config.pretrained_config.torch_dtype
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, mapping=mapping,
                                      tensor_parallel_mode=TensorParallelMode.COLUMN, gather_output=True)
        self.layers = nn.ModuleList(TrtllmLoopDecoderLayer(model_config, cfg, self.rank_cfg, l)
                                    for l in range(cfg.num_hidden_layers))
        self.gate_projections = nn.ModuleList(TrtllmGateProjection(cfg.num_attention_heads, cfg.head_dim, mapping,
                                                                   dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(hidden_size=cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.slot_attention = {s: a for layer in self.layers for s, a in layer.self_attn.slot_attention.items()}
        # pass-1 k|v of every layer for the tokens of one step, preallocated (BufferStash: capture-safe)
        self.register_buffer("kv_stash", torch.zeros(cfg.num_hidden_layers, model_config.max_num_tokens,
                                                     2 * self.rank_cfg.kv_size, dtype=dtype), persistent=False)
        # RoPE frequencies for rope_cos_sin, resident on the model's device: building them in forward would copy
        # host memory to the GPU, which CUDA-graph capture does not allow
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)

    def rope_tables(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos/sin ``[N, head_dim]`` (rotate-half layout) of the step's positions, for the gate's RoPE of q2."""
        return rope_cos_sin(position_ids.reshape(-1), self.loop_cfg.head_dim, self.loop_cfg.rope_theta, dtype,
                            inv_freq=self.rope_inv_freq)

    def use_gate_op(self, device: torch.device) -> bool:
        """Whether pass 2 runs the fused gate op (``$TRTLLM_LOOP_FUSED_GATE``, the op's kernels for ``device``)."""
        if self.fused_gate == "0":
            return False
        if op_available(device):
            return True
        if self.fused_gate == "1":
            raise RuntimeError(f"{FUSED_GATE_ENV}=1 but torch.ops.trtllm_loop.gate_mix has no {device.type} kernel: "
                               "build it with `make plugins` (a CUDA kernel needs a CUDA torch) or unset the variable")
        return False

    def forward(self, attn_metadata, input_ids: torch.Tensor = None, position_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, lora_params=None, **kwargs) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.use_gate_op(h.device):
            backend = TrtllmFusedGateBackend(self.slot_attention, self.rank_cfg, attn_metadata,
                                             position_ids.reshape(-1).to(torch.int32), self.loop_cfg.rope_theta)
        else:
            backend = TrtllmSlotBackend(self.slot_attention, self.rank_cfg, attn_metadata,
                                        *self.rope_tables(position_ids, h.dtype))
        return loop_forward(self, h, backend, self.rank_cfg, BufferStash(self.kv_stash, h.shape[0]))


@register_auto_model(ARCHITECTURE)
class TrtllmLoopForCausalLM(DecoderModelForCausalLM[TrtllmLoopModel, object]):
    """Registered under the checkpoint architecture ``IQuestLoopCoderForCausalLM``; the weights load by their HF
    names through TRT-LLM's generic loader (q/k/v -> qkv_proj, gate/up -> gate_up_proj, TP slicing, NVFP4/FP8)."""

    def __init__(self, model_config: ModelConfig):
        model = TrtllmLoopModel(model_config)
        super().__init__(model, config=model_config, hidden_size=model.loop_cfg.hidden_size,
                         vocab_size=model.loop_cfg.vocab_size)

    def load_weights(self, weights: Dict):
        """No ``weight_mapper`` parameter on purpose: TRT-LLM's ``ModelLoader._call_load_weights`` inspects this
        signature and passes an ``HfWeightMapper`` (the v2 path, ``_load_weights_impl_v2``) only when it names
        one; we take the v1 path (``_load_weights_impl``: HF names, q/k/v and gate/up fusion, KV duplication),
        the one the API double implements and CI checks."""
        super().load_weights(weights)
