"""``convert SRC OUT --to fp8|bf16``: any readable checkpoint -> ModelOpt FP8 unified checkpoint (per-tensor
FP8 E4M3 weights for H100/H200, which have no FP4 tensor cores) or dense BF16.

FP8 tensors per decoder Linear (ModelOpt ``FP8`` unified export layout):
``weight`` float8_e4m3fn ``[N, K]`` = ``fp8(W / weight_scale)``, ``weight_scale`` fp32 ``()`` = amax(W)/448,
``input_scale`` fp32 ``()`` = activation amax/448. q/k/v and gate/up share ``input_scale`` (max of the group)
but keep their own ``weight_scale``, exactly as ModelOpt 0.47's FP8 export does (fixture ``modelopt_fp8``).
Embeddings, ``lm_head``, norms and the loop gates stay BF16. Activation amaxes come from the source's NVFP4
``input_scale`` (amax/2688) or, for weight-only and dense sources, from ``calib_ids`` run through the reference
model (both passes).

Streaming: one pass over the weights for the amaxes, one for writing, one tensor in memory at a time.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from trtllm_loop import nvfp4
from trtllm_loop.checkpoint.dequant import dense_chunks, dense_shape, dense_weight, input_multiplier, weight_amax
from trtllm_loop.checkpoint.formats import DENSE, FUSED_GROUPS, Module, detect_format, group_modules
from trtllm_loop.checkpoint.hf import tensor_index
from trtllm_loop.checkpoint.safetensors_io import read_tensor
from trtllm_loop.checkpoint.validate import check
from trtllm_loop.checkpoint.writer import atomic_dir, copy_side_files, write_tensors
from trtllm_loop.config import LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.fsutil import check_output
from trtllm_loop.quantize.export import EXCLUDE, LINEARS, write_configs  # noqa: F401

FP8 = torch.float8_e4m3fn
HINT = "it is not empty: choose another output directory, or pass --force to replace an earlier output"


def fp8_from_module(mod: Module, scale: float) -> torch.Tensor:
    """FP8 weight of one module, quantized chunk by chunk straight from its stored form."""
    if mod.kind == DENSE and "pre_quant_scale" not in mod.tensors:
        return fp8_quantize(read_tensor(mod.tensors["weight"]), torch.tensor(scale))  # ModelOpt's bf16 arithmetic
    out = torch.empty(dense_shape(mod), dtype=FP8)
    for r, c in dense_chunks(mod):
        c.div_(scale).clamp_(-nvfp4.E4M3_MAX, nvfp4.E4M3_MAX)
        out[r:r + c.shape[0]] = c.to(FP8)
    return out


def fp8_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``fp8(clamp(W / scale, ±448))`` in row chunks. Like ModelOpt, the division runs in W's dtype (a bf16
    weight divided by a 0-d fp32 scale stays bf16), which reproduces ModelOpt's FP8 bytes exactly."""
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(())
    out = torch.empty(w.shape, dtype=FP8)
    step = nvfp4.row_chunk(w.shape[-1])
    for r in range(0, w.shape[0], step):
        out[r:r + step] = (w[r:r + step] / scale).clamp(-nvfp4.E4M3_MAX, nvfp4.E4M3_MAX).to(FP8)
    return out


def _share_fused(values: dict[str, float], layers: int) -> dict[str, float]:
    out = dict(values)
    for i in range(layers):
        for group in FUSED_GROUPS:
            names = [f"model.layers.{i}.{g}" for g in group]
            if all(n in out for n in names):
                m = max(out[n] for n in names)
                out.update({n: m for n in names})
    return out


def convert(src: str | Path, out: str | Path, to: str, calib_ids: list[list[int]] | None = None,
            dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 << 30, force: bool = False) -> dict:
    """Validate ``src``, write ``out`` atomically; returns a summary dict."""
    if to not in ("fp8", "bf16"):
        raise UserError(f"--to {to!r} unknown; allowed: fp8, bf16")
    src, out = Path(src), Path(out)
    if max_shard_bytes <= 0:
        raise UserError(f"--max-shard-gb must be positive (got {max_shard_bytes} bytes)")
    check_output(out, force, HINT, protect=(src,))
    warnings = check(src)
    cfg = LoopConfig.from_file(src)
    info = detect_format(src)
    mods, other = group_modules(tensor_index(src))
    targets = [f"model.layers.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in LINEARS] if to == "fp8" else []

    w_scale, in_scale = {}, {}
    if targets:
        act = {p: input_multiplier(mods[p]) for p in targets if mods[p].quantized}
        act = {p: float(v) * nvfp4.GLOBAL_DIV for p, v in act.items() if v is not None}
        if len(act) < len(targets):
            if not calib_ids:
                raise UserError(f"{src}: {info.quant_algo or 'dense'} checkpoint has no activation scales "
                                f"({len(targets) - len(act)} of {len(targets)} Linears lack input_scale); pass "
                                "--calib-ids FILE.json (token ids) to calibrate them with the reference model")
            from trtllm_loop.quantize.calibrate import activation_amax
            act = activation_amax(src, calib_ids)
        w_amax = {p: weight_amax(mods[p]) for p in tqdm(targets, desc="amax", unit="mod", disable=None)}
        w_scale = {p: v / nvfp4.E4M3_MAX for p, v in w_amax.items()}
        in_scale = {p: v / nvfp4.E4M3_MAX for p, v in _share_fused(act, cfg.num_hidden_layers).items()}

    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    jobs: list[tuple[str, object]] = []  # output name -> how to make it
    scalar = (torch.float32, ())
    shapes = cfg.tensor_shapes()
    for prefix, mod in sorted(mods.items()):
        has_weight = "weight" in mod.tensors or "weight_packed" in mod.tensors
        shape = tuple(shapes.get(mod.weight_name, ()))
        if prefix in w_scale:
            for suffix, spec in (("weight", (FP8, shape)), ("weight_scale", scalar), ("input_scale", scalar)):
                specs[f"{prefix}.{suffix}"] = spec
                jobs.append((f"{prefix}.{suffix}", (suffix, mod)))
        elif has_weight:
            specs[mod.weight_name] = (dtype, shape or tuple(mod.tensors["weight"].shape))
            jobs.append((mod.weight_name, ("dense", mod)))
        if to == "fp8":
            for kv in ("k_scale", "v_scale"):
                if kv in mod.tensors:
                    specs[f"{prefix}.{kv}"] = scalar
                    jobs.append((f"{prefix}.{kv}", ("copy", mod.tensors[kv])))
    for name, ti in sorted(other.items()):
        dt = ti.torch_dtype
        specs[name] = (dtype if dt is not None and dt.is_floating_point else dt, ti.shape)
        jobs.append((name, ("copy", ti)))

    def produce():
        for name, (what, obj) in jobs:
            if what == "weight":
                t = fp8_from_module(obj, w_scale[obj.prefix])
            elif what == "weight_scale":
                t = torch.tensor(w_scale[obj.prefix], dtype=torch.float32)
            elif what == "input_scale":
                t = torch.tensor(in_scale[obj.prefix], dtype=torch.float32)
            elif what == "dense":
                t = dense_weight(obj, dtype)
            else:
                t = read_tensor(obj)
                t = t.to(specs[name][0]).reshape(specs[name][1])
            yield name, t
            del t  # before making the next one: two 786 MB embeddings must not coexist

    has_kv = to == "fp8" and any(n.endswith(("k_scale", "v_scale")) for n in specs)
    with atomic_dir(out, force, HINT, protect=(src,)) as tmp:
        files = write_tensors(tmp, specs, produce(), max_shard_bytes, desc=f"convert->{to}")
        copied = copy_side_files(src, tmp)
        _write_configs(src, tmp, to, has_kv, str(dtype).removeprefix("torch."))
    return {"out": str(out), "to": to, "source_format": info.to_dict(), "files": files, "copied": copied,
            "fp8_linears": len(w_scale), "kv_scales": has_kv,
            "warnings": [str(w) for w in warnings]}


def _write_configs(src: Path, dst: Path, to: str, has_kv: bool, dtype: str) -> None:
    write_configs(src, dst, "FP8" if to == "fp8" else None, has_kv, dtype)
