"""Run the reference model with W4A4 activation emulation: a forward pre-hook per quantized Linear replaces its
input by :func:`trtllm_loop.nvfp4.fake_quant_activation` under the checkpoint's static ``input_scale``."""
from __future__ import annotations

import torch

from trtllm_loop.nvfp4 import fake_quant_activation


def emulate_nvfp4_activations(model: torch.nn.Module, input_scales: dict[str, torch.Tensor],
                              pre_quant_scales: dict[str, torch.Tensor] | None = None) -> list:
    """Hook every Linear named in ``input_scales`` (module name -> fp32 multiplier, as returned by
    ``load_state_dict(..., return_input_scales=True)``). Returns the hook handles (``h.remove()`` to undo)."""
    pqs = pre_quant_scales or {}
    modules = dict(model.named_modules())
    missing = sorted(set(input_scales) - set(modules))
    if missing:
        raise KeyError(f"input scales for modules the model does not have: {missing[:3]}")
    handles = []
    for name, scale in input_scales.items():
        def pre(_mod, args, scale=scale, p=pqs.get(name)):
            return (fake_quant_activation(args[0], scale, p),) + tuple(args[1:])
        handles.append(modules[name].register_forward_pre_hook(pre))
    return handles
