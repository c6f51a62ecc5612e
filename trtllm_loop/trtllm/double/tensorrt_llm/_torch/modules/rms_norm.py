"""Mimics ``tensorrt_llm/_torch/modules/rms_norm.py`` ``RMSNorm`` (non-flashinfer path: fp32 normalisation, cast
back, times the weight), via the project's reference :func:`trtllm_loop.modeling.ops.rms_norm`."""
from typing import Optional

import torch
from torch import nn


class RMSNorm(nn.Module):

    def __init__(self, *, hidden_size: int, eps: float, dtype: Optional[torch.dtype] = None, device=None,
                 has_weights: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, residual=...):
        from trtllm_loop.modeling.ops import rms_norm
        if isinstance(residual, torch.Tensor):
            hidden_states = hidden_states + residual
            residual = hidden_states
        out = rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return out if residual is ... else (out, residual)
