"""The loop's gated mix as one op: ``out = g * global + (1 - g) * local`` with
``g[h] = sigmoid(RoPE(q2)[h] . Wg[h] + bg[h])`` (rotate-half RoPE at the token positions, base ``rope_theta``).

This module fixes the interface shared by the TensorRT plugin (``plugins/loop_gate/``), the PyTorch op
``torch.ops.trtllm_loop.gate_mix`` and the engine-flow model definition; :func:`gate_mix_reference` is the
plain torch composition of :mod:`trtllm_loop.modeling.ops` that every implementation must equal.

Inputs (in this order, for the plugin too):
    q           ``[N, H, D]`` pass-2 query, **pre-RoPE** (what the attention op receives)
    positions   ``[N]`` int32 token positions
    global_out  ``[N, H, D]`` attention over the pass-1 K/V (slot 2l)
    local_out   ``[N, H, D]`` windowed attention over pass 2's own K/V (slot 2l+1)
    gate_weight ``[H, D]``, gate_bias ``[H]``
q, global_out, local_out, gate_weight, gate_bias share one dtype (fp32, fp16 or bf16); output ``[N, H, D]`` in it.
"""
from __future__ import annotations

import torch

from trtllm_loop.modeling.ops import apply_rope, gate, mix, rope_cos_sin

PLUGIN_NAME = "IQuestLoopGateMix"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
# plugin field name -> (TensorRT PluginFieldType name, meaning)
PLUGIN_FIELDS = {
    "num_heads": ("INT32", "H, query heads on this rank"),
    "head_dim": ("INT32", "D"),
    "rope_theta": ("FLOAT32", "RoPE base"),
}


def gate_mix_reference(q, positions, global_out, local_out, gate_weight, gate_bias, rope_theta: float):
    """The torch-ops composition (RoPE of q, gate, mix) in the inputs' dtype, as the model runs it."""
    cos, sin = rope_cos_sin(positions, q.shape[-1], rope_theta, q.dtype)
    return mix(gate(apply_rope(q, cos, sin), gate_weight, gate_bias), global_out, local_out)
