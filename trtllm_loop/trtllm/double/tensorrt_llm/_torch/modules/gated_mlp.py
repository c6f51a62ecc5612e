"""Mimics ``tensorrt_llm/_torch/modules/gated_mlp.py`` ``GatedMLP``: fused gate/up Linear (COLUMN), SwiGLU,
down Linear (ROW, all-reduce)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model_config import ModelConfig
from .linear import Linear, TensorParallelMode, WeightMode, WeightsLoadingConfig


class GatedMLP(nn.Module):

    def __init__(self, *, hidden_size: int, intermediate_size: int, bias: bool, activation=F.silu,
                 dtype: Optional[torch.dtype] = None, config: Optional[ModelConfig] = None,
                 overridden_tp_size: Optional[int] = None, reduce_output: bool = True,
                 layer_idx: Optional[int] = None):
        super().__init__()
        if activation is not F.silu or overridden_tp_size is not None:
            raise NotImplementedError("the double implements SiLU GatedMLP over the full TP group")
        config = config or ModelConfig()
        common = dict(bias=bias, dtype=dtype, mapping=config.mapping, quant_config=config.get_quant_config(),
                      skip_create_weights_in_init=config.skip_create_weights_in_init)
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, tensor_parallel_mode=TensorParallelMode.COLUMN,
                                   weights_loading_config=WeightsLoadingConfig(
                                       weight_mode=WeightMode.FUSED_GATE_UP_LINEAR), **common)
        self.down_proj = Linear(intermediate_size, hidden_size, tensor_parallel_mode=TensorParallelMode.ROW,
                                reduce_output=reduce_output, **common)

    def forward(self, x, all_rank_num_tokens=None, final_all_reduce_params=None, lora_params=None, **kwargs):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, all_reduce_params=final_all_reduce_params)
