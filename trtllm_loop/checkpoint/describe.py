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
