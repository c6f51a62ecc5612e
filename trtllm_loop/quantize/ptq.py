"""Post-training quantization of a dense Loop checkpoint into a ModelOpt unified checkpoint, with ModelOpt 0.47's
numbers (``mtq.quantize(NVFP4_DEFAULT_CFG | W4A16_NVFP4_CFG | FP8_DEFAULT_CFG [+ FP8_KV_CFG])``, max calibration,
``export_hf_checkpoint``; ``shared/docs/nvfp4.md`` sections 2.2-2.3):

* calibration runs the model in its dtype, one sample per forward, with every Linear unquantized; each Linear's
  input amax is the max over **both loop passes** (the same weights run twice, one static input scale covers
  both) -- ModelOpt's max calibrator sees both calls of the shared module;
* NVFP4: ``weight_scale_2 = amax(W) / 2688`` with q/k/v and gate/up sharing the group's max (TRT-LLM fuses them),
  block scales and codes from :func:`trtllm_loop.nvfp4.quantize`; ``input_scale = amax(x) / 2688``, the group max
  for q/k/v and gate/up (ModelOpt ``preprocess_linear_fusion``). W4A16_NVFP4: no ``input_scale``;
* FP8: per-tensor ``weight_scale = amax(W) / 448`` (its own, also inside a fused group), ``input_scale = amax(x) /
  448`` shared by the group (fixture ``modelopt_fp8``);
* FP8 KV: ``k_scale``/``v_scale = amax / 448`` of the k_proj / v_proj outputs over both passes (the pre-RoPE keys,
  as the fixture script's KV quantizer observes them);
* embeddings, lm_head, norms and the loop gates stay in the model dtype.

:func:`quantize_layer` is the one place a layer's tensors are made; the in-memory driver here and the
layer-streamed one (:mod:`trtllm_loop.quantize.stream`) both call it and :func:`write_output`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from trtllm_loop import nvfp4
from trtllm_loop.checkpoint.formats import FUSED_GROUPS, detect_format, group_modules
from trtllm_loop.checkpoint.hf import tensor_index
from trtllm_loop.checkpoint.safetensors_io import read_tensor
from trtllm_loop.checkpoint.writer import write_tensors
from trtllm_loop.config import LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.quantize.convert import fp8_quantize
from trtllm_loop.quantize.export import LINEARS

QFORMATS = {"nvfp4": "NVFP4", "w4a16_nvfp4": "W4A16_NVFP4", "fp8": "FP8"}
AWQ_REASON = ("ModelOpt's AWQ (awq_lite/awq_full) searches its smoothing scales through NVFP4 fake-quant forwards "
              "that assert CUDA in 0.47 (modelopt/torch/quantization/tensor_quant.py:172), and its search order, "
              "loss reductions and the folding of pre_quant_scale into the loop model are not reproducible "
              "byte for byte here; use --qformat nvfp4 (max calibration, ModelOpt-exact)")
FP8 = torch.float8_e4m3fn
SCALAR = (torch.float32, ())
# the Linears of one layer, in the groups that share input_scale (and, for NVFP4, weight_scale_2)
GROUPS = tuple(FUSED_GROUPS) + (("self_attn.o_proj",), ("mlp.down_proj",))
KV = (("self_attn.k_proj", "k_scale"), ("self_attn.v_proj", "v_scale"))


class Observer:
    """Max |input| of each Linear of a layer and max |output| of k_proj / v_proj over every call (both loop
    passes), via forward hooks on the unquantized modules -- what ModelOpt's max calibrator records."""

    def __init__(self, amax: dict[str, float] | None = None):
        self.amax: dict[str, float] = {} if amax is None else amax  # "<prefix>.<linear>" and ".k_scale"/".v_scale"

    def _see(self, key: str, x: torch.Tensor) -> None:
        self.amax[key] = max(self.amax.get(key, 0.0), float(x.detach().abs().amax()))

    def attach(self, layer: torch.nn.Module, prefix: str) -> list:
        handles = []
        for rel in LINEARS:
            handles.append(layer.get_submodule(rel).register_forward_pre_hook(
                lambda _m, args, key=f"{prefix}.{rel}": self._see(key, args[0])))
        for rel, kv in KV:
            handles.append(layer.get_submodule(rel).register_forward_hook(
                lambda _m, _a, out, key=f"{prefix}.{rel}.{kv}": self._see(key, out)))
        return handles


def layer_specs(cfg: LoopConfig, l: int, qformat: str, kv_fp8: bool) -> dict[str, tuple[torch.dtype, tuple]]:
    """Name -> (dtype, shape) of the quantized Linear tensors of layer ``l`` (norms are not included)."""
    shapes = cfg.tensor_shapes()
    specs = {}
    for rel in LINEARS:
        p = f"model.layers.{l}.{rel}"
        n, k = shapes[f"{p}.weight"]
        if qformat == "fp8":
            specs.update({f"{p}.weight": (FP8, (n, k)), f"{p}.weight_scale": SCALAR, f"{p}.input_scale": SCALAR})
        else:
            specs.update({f"{p}.weight": (torch.uint8, (n, k // 2)),
                          f"{p}.weight_scale": (FP8, (n, k // nvfp4.BLOCK)), f"{p}.weight_scale_2": SCALAR})
            if qformat == "nvfp4":
                specs[f"{p}.input_scale"] = SCALAR
    if kv_fp8:
        for rel, kv in KV:
            specs[f"model.layers.{l}.{rel}.{kv}"] = SCALAR
    return specs


def quantize_layer(l: int, weights: Callable[[str], torch.Tensor], amax: dict[str, float], qformat: str,
                   kv_fp8: bool) -> dict[str, torch.Tensor]:
    """The quantized tensors of layer ``l``. ``weights(rel)`` gives the dense weight of ``rel`` (e.g.
    ``self_attn.q_proj``) in the calibration dtype; ``amax`` holds the layer's final calibration statistics."""
    pre = f"model.layers.{l}"
    div = nvfp4.E4M3_MAX if qformat == "fp8" else nvfp4.GLOBAL_DIV
    out: dict[str, torch.Tensor] = {}
    for group in GROUPS:
        x_amax = max(amax[f"{pre}.{rel}"] for rel in group)
        input_scale = torch.tensor(x_amax, dtype=torch.float32) / div
        if qformat != "fp8":
            g = nvfp4.global_scale_from_amax(max(weights(rel).abs().amax().float() for rel in group))
        for rel in group:
            p, w = f"{pre}.{rel}", weights(rel)
            if qformat == "fp8":
                s = w.abs().amax().float() / nvfp4.E4M3_MAX
                out.update({f"{p}.weight": fp8_quantize(w, s), f"{p}.weight_scale": s})
            else:
                packed, scale, _ = nvfp4.quantize(w, g)
                out.update({f"{p}.weight": packed, f"{p}.weight_scale": scale, f"{p}.weight_scale_2": g.clone()})
            if qformat != "w4a16_nvfp4":
                out[f"{p}.input_scale"] = input_scale.clone()
    if kv_fp8:
        for rel, kv in KV:
            out[f"{pre}.{rel}.{kv}"] = torch.tensor(amax[f"{pre}.{rel}.{kv}"], dtype=torch.float32) / nvfp4.E4M3_MAX
    return out


def check_source(src: Path, cfg: LoopConfig) -> dict:
    """A dense checkpoint whose tensors match its config.json (headers only); returns the tensor index."""
    info = detect_format(src)
    index = tensor_index(src)
    mods, _ = group_modules(index)
    quantized = sorted(p for p, m in mods.items() if m.quantized)
    if info.format != "hf" or quantized:
        what = (f"{info.format} {info.quant_algo or ''}".strip() if info.format != "hf"
                else f"{quantized[0]} is {mods[quantized[0]].kind}")
        raise UserError(f"{src}: already quantized ({what}); quantize needs the dense BF16/FP16/FP32 original "
                        "(an NVFP4 checkpoint converts to FP8 with `trtllm-loop convert --to fp8`)")
    expected = cfg.tensor_shapes()
    for name, shape in expected.items():
        if name not in index:
            raise UserError(f"{src}: tensor {name!r} is missing, but config.json (num_hidden_layers="
                            f"{cfg.num_hidden_layers}) needs it; the checkpoint and its config.json do not match")
        if tuple(index[name].shape) != tuple(shape):
            raise UserError(f"{index[name].file}: tensor {name!r} has shape {list(index[name].shape)}, config.json "
                            f"needs {list(shape)}; the checkpoint and its config.json do not match")
        if index[name].dtype not in ("BF16", "F16", "F32"):
            raise UserError(f"{index[name].file}: tensor {name!r} is {index[name].dtype}; quantize reads dense "
                            "BF16/FP16/FP32 weights only")
    extra = sorted(set(index) - set(expected) - {"lm_head.weight"})
    if extra:
        raise UserError(f"{src}: tensor {extra[0]!r} is not part of the model config.json describes "
                        f"({len(extra)} such tensor(s), e.g. layers beyond num_hidden_layers="
                        f"{cfg.num_hidden_layers}); the checkpoint and its config.json do not match")
    for n in ("model.embed_tokens.weight",) + (() if cfg.tie_word_embeddings else ("lm_head.weight",)):
        if n not in index:
            raise UserError(f"{src}: tensor {n!r} is missing")
    return index


def output_specs(cfg: LoopConfig, index: dict, qformat: str, kv_fp8: bool, dtype: torch.dtype
                 ) -> tuple[dict, dict[str, int]]:
    """Every output tensor -> (dtype, shape): per layer its quantized Linears, then the dense rest (norms, gates,
    embeddings, lm_head) in ``dtype``, sorted by name; and quantized tensor name -> its layer."""
    specs: dict = {}
    qlayer: dict[str, int] = {}
    for l in range(cfg.num_hidden_layers):
        ls = layer_specs(cfg, l, qformat, kv_fp8)
        specs.update(sorted(ls.items()))
        qlayer.update({n: l for n in ls})
    dense = {f"model.layers.{l}.{rel}.weight" for l in range(cfg.num_hidden_layers) for rel in LINEARS}
    for name in sorted(set(index) - dense):
        specs[name] = (dtype, tuple(index[name].shape))
    return specs, qlayer


def output_bytes(specs: dict) -> int:
    return sum(math.prod(s) * d.itemsize for d, s in specs.values())


def write_output(tmp: Path, specs: dict, qlayer: dict[str, int], index: dict, layer_tensors: Callable[[int], dict],
                 dtype: torch.dtype, max_shard_bytes: int) -> list[str]:
    """Stream every tensor of ``specs`` into ``tmp``: quantized layer tensors from ``layer_tensors(l)`` (one layer
    held at a time), the rest read from the source and cast to ``dtype``."""
    def produce():
        cur, tensors = None, {}
        for name in specs:
            if name in qlayer:
                if qlayer[name] != cur:
                    cur, tensors = qlayer[name], layer_tensors(qlayer[name])
                yield name, tensors.pop(name)
            else:
                yield name, read_tensor(index[name]).to(dtype)

    return write_tensors(tmp, specs, produce(), max_shard_bytes, desc="write")


def quantize_in_memory(src: Path, cfg: LoopConfig, samples: list[list[int]], qformat: str, kv_fp8: bool,
                       dtype: torch.dtype) -> tuple[Callable[[int], dict], dict[str, float]]:
    """Calibrate the whole model (loaded in RAM) with one forward per sample through
    :func:`trtllm_loop.modeling.loop.loop_forward`; returns (``layer_tensors(l)``, amax)."""
    from tqdm import tqdm

    from trtllm_loop.modeling.load import load_model

    model = load_model(src, dtype)
    obs = Observer()
    handles = [h for l, layer in enumerate(model.model.layers) for h in obs.attach(layer, f"model.layers.{l}")]
    try:
        with torch.no_grad():
            for ids in tqdm(samples, desc="calibrate", unit="sample", disable=None):
                model.model(torch.tensor([ids]), use_cache=False)  # lm_head is excluded: not needed
    finally:
        for h in handles:
            h.remove()
    layers = model.model.layers

    def layer_tensors(l: int) -> dict:
        with torch.no_grad():
            return quantize_layer(l, lambda rel: layers[l].get_submodule(rel).weight, obs.amax, qformat, kv_fp8)
    return layer_tensors, obs.amax
