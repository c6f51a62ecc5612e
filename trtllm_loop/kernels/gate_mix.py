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

The libraries are built by ``make plugins`` into ``build/plugins/`` of the source tree (or the directory named by
``$TRTLLM_LOOP_PLUGIN_DIR``): :func:`plugin_library` is the TensorRT plugin (``IPluginRegistry.load_library``),
:func:`load_op` registers the PyTorch op from ``libtrtllm_loop_ops.so`` and its fake (meta) kernel below, and
:func:`gate_mix` runs the op where it is built for the tensors' device, else the reference.
"""
from __future__ import annotations

import os
from pathlib import Path

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
OP_NAME = "trtllm_loop::gate_mix"
PLUGIN_DIR_ENV = "TRTLLM_LOOP_PLUGIN_DIR"
PLUGIN_FILE = "libiquest_loop_gate.so"          # getCreators(), for IPluginRegistry::loadLibrary
PRELOAD_FILE = "libiquest_loop_gate_preload.so"  # REGISTER_TENSORRT_PLUGIN, for LD_PRELOAD
OP_FILE = "libtrtllm_loop_ops.so"


def gate_mix_reference(q, positions, global_out, local_out, gate_weight, gate_bias, rope_theta: float):
    """The torch-ops composition (RoPE of q, gate, mix) in the inputs' dtype, as the model runs it."""
    cos, sin = rope_cos_sin(positions, q.shape[-1], rope_theta, q.dtype)
    return mix(gate(apply_rope(q, cos, sin), gate_weight, gate_bias), global_out, local_out)


def build_dir() -> Path:
    """Where ``make plugins`` puts the libraries: ``$TRTLLM_LOOP_PLUGIN_DIR``, else ``<source tree>/build/plugins``."""
    env = os.environ.get(PLUGIN_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "build" / "plugins"


def _built(name: str) -> Path | None:
    path = build_dir() / name
    return path if path.is_file() else None


def plugin_library() -> Path | None:
    """The TensorRT plugin library (``IQuestLoopGateMix``), or None where ``make plugins`` has not built it."""
    return _built(PLUGIN_FILE)


def preload_library() -> Path | None:
    """The ``LD_PRELOAD`` variant of the plugin library (registers itself with libnvinfer's registry on load)."""
    return _built(PRELOAD_FILE)


_loaded: Path | None = None


def load_op() -> bool:
    """Register ``torch.ops.trtllm_loop.gate_mix`` (its kernels from the built library, the fake kernel from here);
    False where the library is not built. Idempotent."""
    global _loaded
    if _loaded is None:
        lib = _built(OP_FILE)
        if lib is None:
            return False
        torch.ops.load_library(str(lib))
        torch.library.register_fake(OP_NAME)(_gate_mix_fake)
        _loaded = lib
    return True


def op_available(device: torch.device | str = "cpu") -> bool:
    """The op is built and has a kernel for ``device`` (CUDA only where the library was built with a CUDA torch)."""
    key = "CUDA" if torch.device(device).type == "cuda" else "CPU"
    return load_op() and torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key)


def _gate_mix_fake(q, positions, global_out, local_out, gate_weight, gate_bias, rope_theta):
    """Shapes and dtype only (FakeTensor, torch.compile, the meta device): a new ``[N, H, D]`` in q's dtype."""
    torch._check(q.dim() == 3 and global_out.shape == q.shape and local_out.shape == q.shape,
                 lambda: f"gate_mix: q, global_out, local_out must be one [N, H, D] shape, got {q.shape}, "
                         f"{global_out.shape}, {local_out.shape}")
    torch._check(positions.dtype == torch.int32, lambda: f"gate_mix: positions must be int32, got {positions.dtype}")
    return q.new_empty(q.shape)


def gate_mix(q, positions, global_out, local_out, gate_weight, gate_bias, rope_theta: float,
             use_op: bool | None = None) -> torch.Tensor:
    """The gated mix by the op (``use_op=None``: where it is available for q's device) or the reference."""
    if op_available(q.device) if use_op is None else use_op:
        return torch.ops.trtllm_loop.gate_mix(q, positions, global_out, local_out, gate_weight, gate_bias,
                                              float(rope_theta))
    return gate_mix_reference(q, positions, global_out, local_out, gate_weight, gate_bias, rope_theta)
