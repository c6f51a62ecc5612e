"""Dequantize-on-load: any supported checkpoint -> dense weights under the HF names.

Scale tensors are dropped from the state dict; activation scales (W4A4 ``input_scale``, converted to the
ModelOpt multiplier meaning), AWQ ``pre_quant_scale`` and FP8 KV scales are returned next to it.
NVFP4_AWQ: the dense weight folds ``pre_quant_scale`` in (``W_ckpt * pqs`` column-wise), so
``x @ W_dense.T == (x * pqs) @ W_ckpt.T``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from trtllm_loop import nvfp4
from trtllm_loop.checkpoint.formats import DENSE, FP8, NVFP4_CT, NVFP4_MODELOPT, Module, QuantInfo, detect_format, \
    group_modules
from trtllm_loop.checkpoint.hf import tensor_index
from trtllm_loop.checkpoint.safetensors_io import DENSE_FLOATS, TensorInfo, nonfinite_count, read_tensor
from trtllm_loop.errors import UserError


@dataclass
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    info: QuantInfo
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)      # module prefix -> fp32 () multiplier
    pre_quant_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # module prefix -> [in_features]
    kv_scales: dict[str, torch.Tensor] = field(default_factory=dict)         # "...k_proj.k_scale" -> fp32 ()


_FLOATS = ("F32", "BF16", "F16")


def check_layout(mod: Module) -> None:
    """Cheap structural check of one module's stored tensors (headers only) before anything is dequantized:
    the packed / FP8 weight is 2-D, block scales are ``[out, in/16]`` FP8, per-tensor scales are one float, AWQ
    ``pre_quant_scale`` is ``[in]``. A UserError names the tensor (``trtllm-loop validate`` lists them all)."""
    t = mod.tensors

    def bad(suffix: str, want: str):
        i = t[suffix]
        raise UserError(f"{i.file}: tensor '{mod.prefix}.{suffix}' has dtype {i.dtype} and shape {list(i.shape)}, "
                        f"expected {want}; the export is inconsistent, re-export it (run `trtllm-loop validate` for "
                        "every finding)")

    kind = mod.kind
    if kind in (NVFP4_MODELOPT, NVFP4_CT):
        wkey, gkey = ("weight_packed", "weight_global_scale") if kind == NVFP4_CT else ("weight", "weight_scale_2")
        _need(mod, "weight_scale", gkey)
        pk = t[wkey]
        if pk.dtype != "U8" or len(pk.shape) != 2 or (pk.shape[1] * 2) % nvfp4.BLOCK:
            bad(wkey, "U8 [out, in/2] with in a multiple of 16")
        n, k = pk.shape[0], pk.shape[1] * 2
        if t["weight_scale"].dtype != "F8_E4M3" or tuple(t["weight_scale"].shape) != (n, k // nvfp4.BLOCK):
            bad("weight_scale", f"F8_E4M3 {[n, k // nvfp4.BLOCK]}")
        scalars = (gkey, "input_scale", "input_global_scale", "k_scale", "v_scale")
    elif kind == FP8:
        _need(mod, "weight_scale")
        w, s = t["weight"], t["weight_scale"]
        if len(w.shape) != 2:
            bad("weight", "a 2-D FP8 weight [out, in]")
        if s.dtype not in _FLOATS or math.prod(s.shape) not in (1, w.shape[0]):
            bad("weight_scale", f"one float or {w.shape[0]} (per row)")
        scalars = ("input_scale", "k_scale", "v_scale")
    else:
        if "weight" in t and not t["weight"].shape:
            bad("weight", "a tensor of at least one dimension")
        scalars = ("k_scale", "v_scale")
    for s in scalars:
        if s in t and (t[s].dtype not in _FLOATS or math.prod(t[s].shape) != 1):
            bad(s, "one float (shape [] or [1])")
    if "pre_quant_scale" in t and ("weight" in t or "weight_packed" in t):
        i, shape = t["pre_quant_scale"], dense_shape(mod)
        if len(shape) != 2 or i.dtype not in _FLOATS or tuple(i.shape) != (shape[1],):
            bad("pre_quant_scale", f"a float vector [in_features] of a 2-D weight {list(shape)}")


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


def dense_chunks(mod: Module, fold_pre_quant_scale: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first_row, fp32 rows)`` of one module's dense weight, a few MB at a time, whatever its storage
    (only the stored form, e.g. the packed bytes, is held whole)."""
    kind, t = mod.kind, mod.tensors
    check_layout(mod)
    if kind in (NVFP4_MODELOPT, NVFP4_CT):
        packed = read_tensor(t["weight_packed" if kind == NVFP4_CT else "weight"])
        scale, g = read_tensor(t["weight_scale"]), global_multiplier(mod)
        rows = lambda a, b: nvfp4.dequantize_rows(packed[a:b], scale[a:b], g)  # noqa: E731
        n, k = packed.shape[0], packed.shape[1] * 2
    else:
        w = read_tensor(t["weight"])
        if kind == FP8:
            _need(mod, "weight_scale")
            s = read_tensor(t["weight_scale"]).float()
            s = s.reshape(()) if s.numel() == 1 else s
            rows = lambda a, b: w[a:b].float() * (s if s.dim() == 0 else s[a:b])  # noqa: E731
        else:
            rows = lambda a, b: w[a:b].to(torch.float32, copy=True)  # noqa: E731  (callers may modify it)
        n, k = w.shape[0], w.shape[-1] if w.dim() > 1 else 1
    pqs = read_tensor(t["pre_quant_scale"]).float() if fold_pre_quant_scale and "pre_quant_scale" in t else None
    step = nvfp4.row_chunk(k)
    for r in range(0, n, step):
        c = rows(r, r + step)
        yield r, c * pqs if pqs is not None else c


def dense_shape(mod: Module) -> tuple[int, ...]:
    if mod.kind in (NVFP4_MODELOPT, NVFP4_CT):
        pk = mod.tensors["weight_packed" if mod.kind == NVFP4_CT else "weight"]
        return (pk.shape[0], pk.shape[1] * 2)
    return tuple(mod.tensors["weight"].shape)


def dense_weight(mod: Module, dtype: torch.dtype = torch.float32, fold_pre_quant_scale: bool = True
                 ) -> torch.Tensor:
    """Dense weight of one module in ``dtype`` (computed in fp32, filled chunk by chunk)."""
    t = mod.tensors
    folds = fold_pre_quant_scale and "pre_quant_scale" in t
    if mod.kind == DENSE and t["weight"].torch_dtype == dtype and not folds:
        return read_tensor(t["weight"])
    out = torch.empty(dense_shape(mod), dtype=dtype)
    for r, c in dense_chunks(mod, fold_pre_quant_scale):
        out[r:r + c.shape[0]] = c.to(dtype)
    return out


def weight_amax(mod: Module) -> float:
    """max |W| of the dense weight: from codes and block scales for NVFP4, else chunk by chunk."""
    kind, t = mod.kind, mod.tensors
    if kind in (NVFP4_MODELOPT, NVFP4_CT) and "pre_quant_scale" not in t:
        return nvfp4.dequantized_amax(read_tensor(t["weight_packed" if kind == NVFP4_CT else "weight"]),
                                      read_tensor(t["weight_scale"]), global_multiplier(mod))
    return max(max(-float(lo), float(hi)) for lo, hi in (torch.aminmax(c) for _, c in dense_chunks(mod)))


def _need_float(info: TensorInfo) -> None:
    if info.dtype not in DENSE_FLOATS:
        raise UserError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}; a dense weight must be "
                        f"{', '.join(DENSE_FLOATS)} (or an NVFP4/FP8 weight with its scales); re-export the checkpoint "
                        "(run `trtllm-loop validate` for every finding)")


def _finite(t: torch.Tensor, info: TensorInfo, name: str) -> torch.Tensor:
    bad = nonfinite_count(t)
    if bad:
        raise UserError(f"{info.file}: tensor {name!r} has {bad} NaN/Inf value(s) after loading; the weights (or "
                        "their scales) are corrupt, re-export or re-download the checkpoint")
    return t


def load_checkpoint(ckpt: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False
                    ) -> LoadedCheckpoint:
    """Stream every tensor once; dequantize quantized modules; cast floating tensors to ``dtype``.
    Refused (UserError): dense weights that are not F32/F16/BF16, and any weight with NaN/Inf once loaded."""
    info = detect_format(ckpt)
    index = tensor_index(ckpt)
    mods, other = group_modules(index)
    out = LoadedCheckpoint({}, info)
    for prefix, mod in tqdm(sorted(mods.items()), desc="load", unit="mod", disable=not progress):
        check_layout(mod)
        if "weight" in mod.tensors or "weight_packed" in mod.tensors:
            stored = mod.tensors.get("weight_packed") or mod.tensors["weight"]
            if mod.kind == DENSE:
                _need_float(stored)
            out.state_dict[mod.weight_name] = _finite(dense_weight(mod, dtype), stored, mod.weight_name)
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
        if name.endswith((".weight", ".bias")):
            _need_float(info_t)
        t = read_tensor(info_t)
        out.state_dict[name] = _finite(t.to(dtype), info_t, name) if t.is_floating_point() else t
    return out
