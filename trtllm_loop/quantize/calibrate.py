"""Static activation calibration on the reference model: per-Linear input amax, max over both loop passes
(the same nn.Linear runs in pass 1 and pass 2), as ModelOpt's max calibrator does."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm


def activation_amax(ckpt: str | Path, batches: list[list[int]]) -> dict[str, float]:
    """Linear module name -> max |input| over all ``batches`` (token-id lists) and both passes."""
    from trtllm_loop.modeling.load import load_model
    model = load_model(ckpt, torch.float32)
    amax: dict[str, float] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            def pre(_m, args, name=name):
                amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().amax()))
            handles.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            for ids in tqdm(batches, desc="calibrate", unit="seq", disable=None):
                model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return amax
