"""``validate --fix-fused-scales``: make q/k/v and gate/up share one global weight scale (and input scale), as
TensorRT-LLM requires to fuse them. Block scales are re-expressed under the group's largest multiplier
(ModelOpt ``weight_scale_2`` max; compressed-tensors ``weight_global_scale`` min), keeping the 4-bit values
wherever that is exact."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from trtllm_loop import nvfp4
from trtllm_loop.checkpoint.formats import NVFP4_CT, group_modules
from trtllm_loop.checkpoint.hf import tensor_index
from trtllm_loop.checkpoint.safetensors_io import read_tensor
from trtllm_loop.checkpoint.validate import ERROR, FIX_FUSED, fused_groups, validate
from trtllm_loop.checkpoint.writer import WEIGHT_FILES, atomic_dir, copy_side_files, write_tensors
from trtllm_loop.errors import UserError
from trtllm_loop.fsutil import check_output


def _value(info) -> torch.Tensor:
    return read_tensor(info).float().reshape(())


def fix_fused_scales(src: str | Path, out: str | Path, force: bool = False) -> dict:
    src = Path(src)
    hint = "it is not empty: choose another output directory, or pass --force to replace an earlier output"
    check_output(out, force, hint, protect=(src,))
    other = [f for f in validate(src) if f.level == ERROR and FIX_FUSED not in f.message]
    if other:
        raise UserError(f"{src}: --fix-fused-scales only repairs unequal fused global scales; fix these first:\n  "
                        + "\n  ".join(str(f) for f in other))
    index = tensor_index(src)
    mods, _ = group_modules(index)
    replace: dict[str, torch.Tensor] = {}
    requantized, changed = 0, 0
    for group in fused_groups(mods):
        ct = group[0].kind == NVFP4_CT
        wkey, gkey = ("weight_packed", "weight_global_scale") if ct else ("weight", "weight_scale_2")
        ikey = "input_global_scale" if ct else "input_scale"
        stored = [_value(m.tensors[gkey]) for m in group]
        mult = [nvfp4.ct_to_multiplier(v) if ct else v for v in stored]
        k = max(range(len(group)), key=lambda i: float(mult[i]))
        if len({float(v) for v in stored}) > 1:
            for m, g in zip(group, mult):
                if float(g) == float(mult[k]):
                    continue
                p, s, n = nvfp4.rescale_to_global(read_tensor(m.tensors[wkey]), read_tensor(m.tensors["weight_scale"]),
                                                  g, mult[k])
                replace[f"{m.prefix}.{wkey}"], replace[f"{m.prefix}.weight_scale"] = p, s
                requantized += n
                changed += 1
            for m in group:
                info = m.tensors[gkey]
                replace[f"{m.prefix}.{gkey}"] = stored[k].to(info.torch_dtype).reshape(info.shape)
        if all(ikey in m.tensors for m in group):
            ins = [_value(m.tensors[ikey]) for m in group]
            if len({float(v) for v in ins}) > 1:
                pick = min(ins, key=float) if ct else max(ins, key=float)  # the largest activation amax
                for m in group:
                    info = m.tensors[ikey]
                    replace[f"{m.prefix}.{ikey}"] = pick.to(info.torch_dtype).reshape(info.shape)
    specs = {n: (i.torch_dtype, i.shape) for n, i in sorted(index.items())}

    def produce():
        for n in specs:
            yield n, replace[n] if n in replace else read_tensor(index[n])

    with atomic_dir(out, force, hint, protect=(src,)) as tmp:
        write_tensors(tmp, specs, produce(), desc="fix-fused-scales")
        copy_side_files(src, tmp)
        for f in WEIGHT_FILES - {"model.safetensors.index.json"}:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
    msg = (f"wrote {out}: {changed} tensor(s) re-expressed under their fused group's global scale; "
           + ("4-bit values unchanged (exact)" if not requantized else
              f"{requantized} block(s) were not exactly representable and were re-quantized (lossy)"))
    return {"out": str(out), "changed": changed, "requantized_blocks": requantized, "message": msg}
