"""``describe(ckpt)``: the checkpoint summary ``inspect`` prints."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from trtllm_loop.checkpoint.formats import detect_format, group_modules
from trtllm_loop.checkpoint.hf import tensor_index
from trtllm_loop.checkpoint.validate import validate
from trtllm_loop.errors import UserError


def describe(ckpt: str | Path) -> dict:
    """format, quant_algo, group_size, kv_cache_quant, exclude_modules, producer, module kinds
    (e.g. {"nvfp4-modelopt": 14, "dense": 3}), kv_scales (names), pre_quant_scales (module names), findings."""
    d: dict = {}
    try:
        d.update(detect_format(ckpt).to_dict())
        mods, _ = group_modules(tensor_index(ckpt))
        d["module_kinds"] = dict(Counter(m.kind for m in mods.values()))
        d["kv_scales"] = sorted(f"{m.prefix}.{s}" for m in mods.values() for s in ("k_scale", "v_scale")
                                if s in m.tensors)
        d["pre_quant_scales"] = sorted(m.prefix for m in mods.values() if "pre_quant_scale" in m.tensors)
    except UserError:
        pass  # validate() reports it
    d["findings"] = [{"level": f.level, "file": f.file, "tensor": f.tensor, "message": f.message}
                     for f in validate(ckpt)]
    return d


def describe_lines(d: dict) -> list[str]:
    """Human-readable lines for a :func:`describe` dict (what ``inspect`` prints)."""
    algo = d.get("quant_algo") or "dense"
    head = f"format {d.get('format')} {algo}"
    if d.get("group_size"):
        head += f", group size {d['group_size']}"
    if d.get("producer"):
        head += f", producer {d['producer']}"
    lines = [head]
    kv = d.get("kv_cache_quant")
    lines.append(f"KV cache quant {kv or 'none'}" + (f" ({len(d.get('kv_scales', []))} k/v scale tensors)"
                                                    if d.get("kv_scales") else ""))
    kinds = d.get("module_kinds") or {}
    if kinds:
        lines.append("modules: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    if d.get("pre_quant_scales"):
        lines.append(f"AWQ pre_quant_scale on {len(d['pre_quant_scales'])} modules")
    if d.get("exclude_modules"):
        lines.append("excluded: " + ", ".join(d["exclude_modules"]))
    f = d.get("findings", [])
    n_err = sum(x["level"] == "error" for x in f)
    lines.append("validation: " + ("OK" if not f else f"{n_err} error(s), {len(f) - n_err} warning(s)"))
    for x in f:
        where = f"{x['file']}: tensor {x['tensor']!r}: " if x.get("tensor") else \
            "" if x["message"].startswith(x["file"]) else f"{x['file']}: "
        lines.append(f"  {x['level']}: {where}{x['message']}")
    return lines
