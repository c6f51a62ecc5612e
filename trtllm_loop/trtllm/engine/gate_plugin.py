"""The loop gate as a TensorRT plugin layer in the engine flow: the creator looked up in TensorRT's plugin
registry and the layer added with ``add_plugin_v3``, the way TensorRT-LLM 1.x adds its own v3 plugins
(``tensorrt_llm/functional.py`` ``dora_plugin`` / ``cp_split_plugin``: ``get_creator`` -> ``create_plugin(name,
fields, TensorRTPhase.BUILD)`` -> ``default_trtnet().add_plugin_v3(inputs, [], plugin)`` -> ``_create_tensor``).

The interface (name, version, fields, input order) is :mod:`trtllm_loop.kernels.gate_mix`'s. The creator comes
from the plugin library (``plugins/loop_gate/``), which registers itself when loaded (``ctypes.CDLL`` here,
``LD_PRELOAD`` for ``tritonserver`` and the C++ runtime). On the API double, :func:`load_gate_plugin` registers
:class:`ReferenceGateMixCreator` instead, whose plugin runs :func:`~trtllm_loop.kernels.gate_mix.gate_mix_reference`."""
from __future__ import annotations

import ctypes

import numpy as np

import tensorrt as trt
from tensorrt_llm._common import default_trtnet
from tensorrt_llm.functional import _add_plugin_info, _create_tensor

from trtllm_loop.errors import UserError
from trtllm_loop.kernels.gate_mix import (PLUGIN_FIELDS, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION,
                                          gate_mix_reference)

_NP = {"INT32": np.int32, "FLOAT32": np.float32}


def plugin_fields(num_heads: int, head_dim: int, rope_theta: float) -> "trt.PluginFieldCollection":
    values = {"num_heads": num_heads, "head_dim": head_dim, "rope_theta": rope_theta}
    return trt.PluginFieldCollection([
        trt.PluginField(name, np.array([values[name]], dtype=_NP[kind]), getattr(trt.PluginFieldType, kind))
        for name, (kind, _) in PLUGIN_FIELDS.items()])


def gate_mix_plugin(q, positions, global_out, local_out, gate_weight, gate_bias, *, num_heads: int, head_dim: int,
                    rope_theta: float):
    """``g * global + (1 - g) * local`` with ``g = sigmoid(RoPE(q) . Wg + bg)`` as one plugin layer; all inputs
    are network tensors in the plugin's input order."""
    creator = trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if creator is None:
        raise UserError(f"TensorRT plugin {PLUGIN_NAME} v{PLUGIN_VERSION} is not registered: load the loop gate "
                        "plugin library first (build with --gate-plugin LIB, or build without the plugin flag to "
                        "use the functional gate)")
    fields = plugin_fields(num_heads, head_dim, rope_theta)
    plugin = creator.create_plugin("loop_gate_mix", fields, trt.TensorRTPhase.BUILD)
    inputs = [q, positions, global_out, local_out, gate_weight, gate_bias]
    layer = default_trtnet().add_plugin_v3([t.trt_tensor for t in inputs], [], plugin)
    _add_plugin_info(layer, creator, "loop_gate_mix", fields)
    return _create_tensor(layer.get_output(0), layer)


class ReferencePlugin:
    """The double's plugin object: ``enqueue_eager`` on torch tensors (``gate_mix_reference``)."""

    plugin_name, plugin_version, plugin_namespace = PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE

    def __init__(self, fields):
        got = {f.name: f for f in fields}
        if set(got) != set(PLUGIN_FIELDS):
            raise ValueError(f"{PLUGIN_NAME}: fields {sorted(got)}, expected {sorted(PLUGIN_FIELDS)}")
        for name, (kind, _) in PLUGIN_FIELDS.items():
            if got[name].type != getattr(trt.PluginFieldType, kind):
                raise ValueError(f"{PLUGIN_NAME}: field {name} is {got[name].type.name}, expected {kind}")
        self.fields = fields
        self.num_heads = int(got["num_heads"].data[0])
        self.head_dim = int(got["head_dim"].data[0])
        self.rope_theta = float(got["rope_theta"].data[0])

    def enqueue_eager(self, inputs):
        import torch

        q, positions, global_out, local_out, weight, bias = inputs
        if positions.dtype != torch.int32:
            raise TypeError(f"{PLUGIN_NAME}: positions must be int32, got {positions.dtype}")
        if q.shape[-2:] != (self.num_heads, self.head_dim) or tuple(weight.shape) != (self.num_heads, self.head_dim):
            raise ValueError(f"{PLUGIN_NAME}: q {tuple(q.shape)} / gate_weight {tuple(weight.shape)} do not match "
                             f"num_heads {self.num_heads} x head_dim {self.head_dim}")
        if len({t.dtype for t in (q, global_out, local_out, weight, bias)}) != 1:
            raise TypeError(f"{PLUGIN_NAME}: q, global_out, local_out, gate_weight, gate_bias must share one dtype")
        return [gate_mix_reference(q, positions, global_out, local_out, weight, bias, self.rope_theta)]


class ReferenceGateMixCreator:
    name, plugin_version, plugin_namespace = PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE

    def create_plugin(self, name, field_collection, phase):
        return ReferencePlugin(field_collection)


def load_gate_plugin(library: str | None = None) -> None:
    """Make the gate plugin's creator visible in TensorRT's registry: the library with ``ctypes.CDLL`` (global
    symbols, as TRT-LLM loads its own plugin library), or on the API double the reference creator."""
    registry = trt.get_plugin_registry()
    if getattr(trt, "IS_TRTLLM_LOOP_DOUBLE", False):
        if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
            registry.register_creator(ReferenceGateMixCreator(), PLUGIN_NAMESPACE)
        return
    if library is None:
        raise UserError("the gate plugin needs its library (plugins/loop_gate build output): pass --gate-plugin LIB")
    try:
        ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise UserError(f"{library}: cannot load the gate plugin library ({e})") from None
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise UserError(f"{library} loaded but registers no {PLUGIN_NAME} v{PLUGIN_VERSION} creator; rebuild "
                        "plugins/loop_gate against this TensorRT")
