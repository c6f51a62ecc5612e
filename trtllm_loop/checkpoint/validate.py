"""Checkpoint validator: every finding names the file, the tensor and the fix.

Checks (issue 3, bad-input matrix): shards present and complete; every tensor the config expects is in the
index and in its shard; dtypes and shapes (packed ``[N, K/2]`` uint8, block scales ``[N, K/16]`` fp8, scalar
globals); NaN/Inf/zero scales; global scales stored in the other producer's convention; unequal q/k/v or
gate/up global scales; quantized loop-gate tensors; quantized tensors the config does not know.
Reads headers plus the (small) scale tensors only, one at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trtllm_loop import nvfp4
from trtllm_loop.checkpoint.formats import FP8, FUSED_GROUPS, NVFP4_CT, NVFP4_MODELOPT, Module, detect_format, \
    group_modules
from trtllm_loop.checkpoint.hf import INDEX, duplicate_tensors, tensor_index, unindexed_tensors
from trtllm_loop.checkpoint.safetensors_io import DENSE_FLOATS, nonfinite_count, read_tensor
from trtllm_loop.config import ConfigError, LoopConfig
from trtllm_loop.errors import UserError

ERROR, WARNING = "error", "warning"
# plausible |W| maxima and activation maxima; the two global-scale conventions differ by ~amax^2/2688^2,
# so a value fits one convention inside these ranges and the other far outside them
WEIGHT_AMAX = (1e-5, 1e3)
ACT_AMAX = (1e-4, 1e5)
FIX_FUSED = "run `trtllm-loop validate CKPT --fix-fused-scales OUT` to write a corrected copy"


@dataclass(frozen=True)
class Finding:
    level: str
    file: str
    tensor: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: tensor {self.tensor!r}: " if self.tensor else f"{self.file}: "
        if not self.tensor and self.message.startswith(self.file):
            where = ""  # the message already names its file
        return f"{self.level}: {where}{self.message}"


class _Collector(list):
    def add(self, level, file, tensor, message):
        self.append(Finding(level, str(file), tensor, message))


def validate(ckpt: str | Path) -> list[Finding]:
    """All findings for ``ckpt``; structural problems (missing/truncated shard) come back as one error."""
    ckpt = Path(ckpt)
    out = _Collector()
    try:
        cfg = LoopConfig.from_file(ckpt)
        info = detect_format(ckpt)
        index = tensor_index(ckpt)
    except (UserError, ConfigError) as e:
        out.add(ERROR, ckpt, None, str(e))
        return out
    mods, other = group_modules(index)
    expected = cfg.tensor_shapes()
    _check_presence(out, ckpt, expected, mods, other)
    for mod in mods.values():
        _check_module(out, mod, expected)
    _check_fused(out, mods)
    n_quant = sum(m.quantized for m in mods.values())
    if info.format == "hf" and n_quant:
        out.add(WARNING, ckpt / "config.json", None, f"{n_quant} modules hold quantized tensors but no quantization "
                "config was found (hf_quant_config.json or config.json quantization_config); they are still read "
                "from their tensors")
    if info.format != "hf" and not n_quant:
        out.add(WARNING, info.source, None, "the config declares quantization but no module stores quantized "
                "weights; the checkpoint is read as dense")
    has_kv = any("k_scale" in m.tensors or "v_scale" in m.tensors for m in mods.values())
    if has_kv and not info.kv_cache_quant:
        out.add(WARNING, info.source or ckpt, None, "k_scale/v_scale tensors are present but the config declares no "
                "KV-cache quantization; they are reported, not applied")
    return out


def check(ckpt: str | Path) -> list[Finding]:
    """Validate and raise :class:`UserError` listing every error; returns the warnings."""
    findings = validate(ckpt)
    errors = [f for f in findings if f.level == ERROR]
    if errors:
        n = f" ({len(errors)} errors)" if len(errors) > 1 else ""  # one line, every error (`validate` lists them)
        raise UserError(f"{ckpt}: checkpoint failed validation{n}: " +
                        "; ".join(str(f).removeprefix("error: ") for f in errors))
    return findings


# ------------------------------------------------------------------------------------------------ checks
def _check_presence(out, ckpt, expected, mods, other) -> None:
    for name, files in duplicate_tensors(ckpt).items():
        out.add(ERROR, files[1], name, f"is stored in {len(files)} files ({', '.join(f.name for f in files)}); a "
                "tensor must be stored once: remove the stale shard or re-export the checkpoint")
    stray = unindexed_tensors(ckpt)
    for name, f in stray.items():
        out.add(ERROR, ckpt / INDEX, name, f"is stored in {f.name} but missing from the index; regenerate "
                f"{INDEX} (or copy the export's own index again)")
    for name in expected:
        prefix, suffix = name.rsplit(".", 1)
        if suffix == "weight" and prefix in mods and ("weight" in mods[prefix].tensors or
                                                     "weight_packed" in mods[prefix].tensors):
            continue
        if name in other or name in stray:
            continue
        out.add(ERROR, ckpt, name, "is missing from the checkpoint (not in the index nor in any shard); the "
                "export is incomplete or was made for another config, re-export it from the full model")
    for name, info in other.items():
        if name not in expected:
            out.add(WARNING, info.file, name, "is not part of this config's model; it is ignored")
        elif info.dtype not in DENSE_FLOATS:
            out.add(ERROR, info.file, name, f"has dtype {info.dtype}; expected a float tensor "
                    f"({', '.join(DENSE_FLOATS)}); re-export the checkpoint")
        elif tuple(info.shape) != tuple(expected[name]):
            out.add(ERROR, info.file, name, f"has shape {list(info.shape)}, config.json expects "
                    f"{list(expected[name])}; the checkpoint and its config.json do not match")
        else:
            _check_finite(out, info, name)


def _expected_shape(mod: Module, expected) -> tuple[int, int] | None:
    s = expected.get(mod.weight_name)
    return tuple(s) if s is not None and len(s) == 2 else None


def _check_module(out, mod: Module, expected) -> None:
    t = mod.tensors
    wname = mod.weight_name
    anyf = next(iter(t.values())).file
    if mod.prefix.startswith("model.gate_projections.") and (mod.quantized or set(t) - {"weight"}):
        out.add(ERROR, anyf, wname, "the loop gate is quantized; gate tensors must stay BF16 (dense [heads, "
                "head_dim] weight and [heads] bias). Re-export with the gate excluded (ModelOpt: quant_cfg "
                "'*gate_projections*': {'enable': False}; llm-compressor: ignore=['re:.*gate_projections.*'])")
        return
    shape = _expected_shape(mod, expected)
    if wname not in expected:
        if mod.quantized:
            out.add(ERROR, anyf, wname, f"is quantized ({mod.kind}) but this config has no such module; the "
                    "checkpoint was exported from a different model or config, check config.json")
        elif "weight" in t:
            out.add(WARNING, t["weight"].file, wname, "is not part of this config's model; it is ignored")
        return
    kind = mod.kind
    if kind in (NVFP4_MODELOPT, NVFP4_CT):
        _check_nvfp4(out, mod, shape)
    elif kind == FP8:
        _check_fp8(out, mod, shape)
    elif "weight" in t:
        w = t["weight"]
        if w.dtype not in DENSE_FLOATS:
            out.add(ERROR, w.file, wname, f"has dtype {w.dtype} but no block scales; expected a dense float weight "
                    "or an NVFP4 weight with weight_scale; re-export the checkpoint")
        elif tuple(w.shape) != tuple(expected[wname]):
            out.add(ERROR, w.file, wname, f"has shape {list(w.shape)}, config.json expects "
                    f"{list(expected[wname])}; the checkpoint and its config.json do not match")
        else:
            _check_finite(out, w, wname)
        stray = set(t) - {"weight"}
        if stray:
            out.add(WARNING, w.file, wname, f"is dense but has scale tensors {sorted(stray)}; they are ignored")


def _check_finite(out, info, name) -> None:
    """Scan a dense float tensor for NaN/Inf (one tensor in memory at a time)."""
    bad = nonfinite_count(read_tensor(info))
    if bad:
        out.add(ERROR, info.file, name, f"has {bad} NaN/Inf value(s) out of {math.prod(info.shape)}; the weights "
                "are corrupt, re-export or re-download the checkpoint")


def _check_shape_dtype(out, info, name, want_dtype, want_shape, why) -> bool:
    ok = True
    if info.dtype not in want_dtype:
        out.add(ERROR, info.file, name, f"has dtype {info.dtype}, expected {' or '.join(want_dtype)} ({why}); "
                "re-export the checkpoint with a supported NVFP4 exporter (ModelOpt or llm-compressor)")
        ok = False
    if want_shape is not None and tuple(info.shape) != tuple(want_shape):
        out.add(ERROR, info.file, name, f"has shape {list(info.shape)}, expected {list(want_shape)} ({why}); the "
                "export does not match config.json, re-export it from this model")
        ok = False
    return ok


def _scalar_ok(out, info, name) -> bool:
    if math.prod(info.shape) != 1:
        out.add(ERROR, info.file, name, f"has shape {list(info.shape)}, expected a scalar (shape [] or [1]); "
                "re-export the checkpoint")
        return False
    if info.dtype not in ("F32", "BF16", "F16"):
        out.add(ERROR, info.file, name, f"has dtype {info.dtype}, expected F32; re-export the checkpoint")
        return False
    return True


def _check_values(out, info, name, what) -> torch.Tensor | None:
    v = read_tensor(info).float()
    bad_nan, bad_inf, bad_zero = int(v.isnan().sum()), int(v.isinf().sum()), int((v == 0).sum())
    neg = int((v < 0).sum())
    if bad_nan or bad_inf or bad_zero or neg:
        parts = [f"{c} {k}" for c, k in ((bad_nan, "NaN"), (bad_inf, "Inf"), (bad_zero, "zero"), (neg, "negative"))
                 if c]
        out.add(ERROR, info.file, name, f"{what} has {', '.join(parts)} value(s) out of {v.numel()}; the export is "
                "broken (a zero or non-finite scale destroys the weights it covers), re-export the checkpoint")
        return None
    return v


def _check_nvfp4(out, mod: Module, shape) -> None:
    t, ct = mod.tensors, mod.kind == NVFP4_CT
    wkey, gkey = ("weight_packed", "weight_global_scale") if ct else ("weight", "weight_scale_2")
    n, k = shape
    name = lambda s: f"{mod.prefix}.{s}"  # noqa: E731
    if k % nvfp4.BLOCK:
        out.add(ERROR, t[wkey].file, name(wkey), f"in_features {k} is not a multiple of 16; NVFP4 cannot store it, "
                "exclude this module from quantization")
        return
    ok = _check_shape_dtype(out, t[wkey], name(wkey), ("U8",), (n, k // 2), "packed E2M1, [out, in/2]")
    for s in ("weight_scale", gkey):
        if s not in t:
            out.add(ERROR, t[wkey].file, name(s), f"is missing; every NVFP4 weight needs weight_scale and {gkey}. "
                    "The export is incomplete, re-export the checkpoint")
            ok = False
    if not ok:
        return
    ok = _check_shape_dtype(out, t["weight_scale"], name("weight_scale"), ("F8_E4M3",), (n, k // 16),
                            "FP8 E4M3 block scales, [out, in/16]")
    if not _scalar_ok(out, t[gkey], name(gkey)) or not ok:
        return
    s = _check_values(out, t["weight_scale"], name("weight_scale"), "block scale")
    g = _check_values(out, t[gkey], name(gkey), "global scale")
    if s is None or g is None:
        return
    _check_direction(out, t[gkey], name(gkey), float(g), float(s.max()) * nvfp4.E2M1_MAX, ct, WEIGHT_AMAX,
                     "weight")
    ikey = "input_global_scale" if ct else "input_scale"
    if ikey in t and _scalar_ok(out, t[ikey], name(ikey)):
        v = _check_values(out, t[ikey], name(ikey), "input scale")
        if v is not None:
            _check_direction(out, t[ikey], name(ikey), float(v), nvfp4.GLOBAL_DIV, ct, ACT_AMAX, "activation")
    if "pre_quant_scale" in t:
        _check_shape_dtype(out, t["pre_quant_scale"], name("pre_quant_scale"), ("BF16", "F16", "F32"), (k,),
                           "AWQ input smoothing, [in_features]")


def _check_direction(out, info, name, stored, factor, ct, plausible, what) -> None:
    """``factor * multiplier`` is the implied amax; say which convention the stored number fits."""
    as_mo, as_ct = factor * stored, factor / stored
    lo, hi = plausible
    fits_mo, fits_ct = lo <= as_mo <= hi, lo <= as_ct <= hi
    mine, theirs = (as_ct, as_mo) if ct else (as_mo, as_ct)
    fits_mine, fits_theirs = (fits_ct, fits_mo) if ct else (fits_mo, fits_ct)
    if fits_mine:
        return
    this, other = (("as a compressed-tensors divisor (2688/amax)", "ModelOpt convention (a multiplier, amax/2688)")
                   if ct else ("as a ModelOpt multiplier (amax/2688)",
                               "compressed-tensors convention (a divisor, 2688/amax)"))
    if fits_theirs:
        out.add(ERROR, info.file, name, f"global scale {stored:.6g} looks inverted: {this} it implies a {what} amax "
                f"of {mine:.3g}, but it fits the {other} with amax {theirs:.3g}. The exporter wrote the reciprocal: "
                f"fix the exporter, or store 1/{stored:.6g}")
    else:
        out.add(WARNING, info.file, name, f"global scale {stored:.6g} implies a {what} amax of {mine:.3g}, outside "
                f"the plausible range {lo:g}..{hi:g}; check the export")


def _check_fp8(out, mod: Module, shape) -> None:
    t = mod.tensors
    _check_shape_dtype(out, t["weight"], mod.weight_name, ("F8_E4M3",), shape, "FP8 weight, [out, in]")
    if "weight_scale" not in t:
        out.add(ERROR, t["weight"].file, f"{mod.prefix}.weight_scale", "is missing; an FP8 weight needs its scale. "
                "The export is incomplete, re-export the checkpoint")
    elif _scalar_ok(out, t["weight_scale"], f"{mod.prefix}.weight_scale"):
        _check_values(out, t["weight_scale"], f"{mod.prefix}.weight_scale", "FP8 weight scale")


def fused_groups(mods: dict[str, Module]) -> list[list[Module]]:
    groups = []
    layers = sorted({m.prefix.rsplit(".", 2)[0] for m in mods.values() if m.prefix.startswith("model.layers.")})
    for layer in layers:
        for names in FUSED_GROUPS:
            g = [mods.get(f"{layer}.{n}") for n in names]
            if all(m is not None and m.kind in (NVFP4_MODELOPT, NVFP4_CT) for m in g):
                groups.append(g)
    return groups


def _check_fused(out, mods) -> None:
    for g in fused_groups(mods):
        ct = g[0].kind == NVFP4_CT
        for key, label in (("weight_global_scale" if ct else "weight_scale_2", "weight"),
                           ("input_global_scale" if ct else "input_scale", "input")):
            infos = [m.tensors.get(key) for m in g]
            if any(i is None for i in infos) or any(math.prod(i.shape) != 1 for i in infos):
                continue
            vals = [float(read_tensor(i).float().reshape(())) for i in infos]
            if not all(math.isfinite(v) and v > 0 for v in vals):
                continue  # already reported per tensor
            if len(set(vals)) > 1:
                listing = ", ".join(f"{m.prefix.rsplit('.', 1)[1]}={v:.6g}" for m, v in zip(g, vals))
                out.add(ERROR, infos[0].file, f"{g[0].prefix}.{key}", f"the fused group "
                        f"{'/'.join(m.prefix.rsplit('.', 1)[1] for m in g)} has different {label} global scales "
                        f"({listing}); TensorRT-LLM asserts they are equal when it fuses them. {FIX_FUSED}")
