"""Dequantize-on-load: any supported checkpoint -> dense weights under the HF names.

Scale tensors are dropped from the state dict; activation scales (W4A4 ``input_scale``, converted to the
ModelOpt multiplier meaning), AWQ ``pre_quant_scale`` and FP8 KV scales are returned next to it.
NVFP4_AWQ: the dense weight folds ``pre_quant_scale`` in (``W_ckpt * pqs`` column-wise), so
``x @ W_dense.T == (x * pqs) @ W_ckpt.T``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from trtllm_loop import nvfp4
from trtllm_loop.checkpoint.formats import FP8, NVFP4_CT, NVFP4_MODELOPT, Module, QuantInfo, detect_format, \
    group_modules
from trtllm_loop.checkpoint.hf import tensor_index
from trtllm_loop.checkpoint.safetensors_io import read_tensor
from trtllm_loop.errors import UserError


@dataclass
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    info: QuantInfo
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)      # module prefix -> fp32 () multiplier
    pre_quant_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # module prefix -> [in_features]
    kv_scales: dict[str, torch.Tensor] = field(default_factory=dict)         # "...k_proj.k_scale" -> fp32 ()


def _scalar(mod: Module, suffix: str) -> torch.Tensor:
    return read_tensor(mod.tensors[suffix]).float().reshape(())


def _need(mod: Module, *suffixes: str) -> None:
    for s in suffixes:
        if s not in mod.tensors:
            some = next(iter(mod.tensors.values()))
            raise UserError(f"{some.file}: module {mod.prefix!r} is {mod.kind} but has no {mod.prefix}.{s}; the "
                            "export is incomplete, re-export the checkpoint (run `trtllm-loop validate` for details)")


def global_multiplier(mod: Module) -> torch.Tensor:
    """The per-tensor weight scale as a dequant multiplier (ModelOpt meaning), fp32 ()."""
    if mod.kind == NVFP4_CT:
        return nvfp4.ct_to_multiplier(read_tensor(mod.tensors["weight_global_scale"]))
    return _scalar(mod, "weight_scale_2")


def input_multiplier(mod: Module) -> torch.Tensor | None:
    if "input_scale" in mod.tensors:
        return _scalar(mod, "input_scale")
    if "input_global_scale" in mod.tensors:
        return nvfp4.ct_to_multiplier(read_tensor(mod.tensors["input_global_scale"]))
    return None


def dense_weight(mod: Module, fold_pre_quant_scale: bool = True, keep_dtype: bool = False) -> torch.Tensor:
    """fp32 dense weight of one module, whatever its storage (``keep_dtype``: a dense weight keeps its dtype)."""
    kind = mod.kind
    if kind == NVFP4_MODELOPT:
        _need(mod, "weight_scale", "weight_scale_2")
        w = nvfp4.dequantize(read_tensor(mod.tensors["weight"]), read_tensor(mod.tensors["weight_scale"]),
                             global_multiplier(mod))
    elif kind == NVFP4_CT:
        _need(mod, "weight_scale", "weight_global_scale")
        w = nvfp4.dequantize(read_tensor(mod.tensors["weight_packed"]), read_tensor(mod.tensors["weight_scale"]),
                             global_multiplier(mod))
    elif kind == FP8:
        _need(mod, "weight_scale")
        s = read_tensor(mod.tensors["weight_scale"]).float()
        w = read_tensor(mod.tensors["weight"]).float() * (s.reshape(()) if s.numel() == 1 else s)
    else:
        w = read_tensor(mod.tensors["weight"])
        w = w if keep_dtype and "pre_quant_scale" not in mod.tensors else w.float()
    if fold_pre_quant_scale and "pre_quant_scale" in mod.tensors:
        w = w * read_tensor(mod.tensors["pre_quant_scale"]).float()
    return w


def load_checkpoint(ckpt: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False
                    ) -> LoadedCheckpoint:
    """Stream every tensor once; dequantize quantized modules; cast floating tensors to ``dtype``."""
    info = detect_format(ckpt)
    index = tensor_index(ckpt)
    mods, other = group_modules(index)
    out = LoadedCheckpoint({}, info)
    for prefix, mod in tqdm(sorted(mods.items()), desc="load", unit="mod", disable=not progress):
        if "weight" in mod.tensors or "weight_packed" in mod.tensors:
            out.state_dict[mod.weight_name] = dense_weight(mod).to(dtype)
        if mod.quantized:
            s = input_multiplier(mod)
            if s is not None:
                out.input_scales[prefix] = s
        if "pre_quant_scale" in mod.tensors:
            out.pre_quant_scales[prefix] = read_tensor(mod.tensors["pre_quant_scale"]).float()
        for kv in ("k_scale", "v_scale"):
            if kv in mod.tensors:
                out.kv_scales[f"{prefix}.{kv}"] = _scalar(mod, kv)
    for name, info_t in other.items():
        t = read_tensor(info_t)
        out.state_dict[name] = t.to(dtype) if t.is_floating_point() else t
    return out
