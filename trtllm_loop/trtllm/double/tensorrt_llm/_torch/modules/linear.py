"""Mimics ``tensorrt_llm/_torch/modules/linear.py`` (1.2.1): ``Linear`` with tensor-parallel splitting, fused
QKV / gate-up weight loading and quantized checkpoints.

TP (as ``load_weight_shard``): COLUMN splits output rows, each fused part (q, k, v / gate, up) separately, then
concatenates the rank's parts; ROW splits input columns and all-reduces the output. NVFP4 / FP8 (as
``NVFP4LinearMethod`` / ``FP8QDQLinearMethod`` load them): the checkpoint's packed weight, block scales and
global scales are read, and the weight is dequantized with :mod:`trtllm_loop.nvfp4` (the GPU keeps it packed and
runs an FP4 GEMM; the values are the same). Fused parts must share ``weight_scale_2`` and ``input_scale``
(TRT-LLM asserts this). W4A4 checkpoints (with ``input_scale``) have their activations quantized to NVFP4 under
the static ``input_scale``, as the FP4 GEMM does.
"""
import enum
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import Parameter

from tensorrt_llm.mapping import Mapping
from tensorrt_llm.models.modeling_utils import QuantConfig
from tensorrt_llm.quantization.mode import QuantAlgo


class WeightMode(str, enum.Enum):
    VANILLA = "vanilla"
    FUSED_QKV_LINEAR = "fused_qkv_linear"
    FUSED_GATE_UP_LINEAR = "fused_gate_up_linear"


@dataclass(kw_only=True)
class WeightsLoadingConfig:
    weight_mode: WeightMode = WeightMode.VANILLA
    ignore_tensor_parallel: bool = False


class TensorParallelMode(str, enum.Enum):
    COLUMN = "column"
    ROW = "row"

    @classmethod
    def split_dim(cls, mode) -> int:
        return 1 if mode == cls.ROW else 0


def load_weight_shard(weight, tensor_parallel_size=1, tensor_parallel_rank=0, tensor_parallel_mode=None,
                      device=torch.device("cpu")) -> torch.Tensor:
    """This rank's slice: ``ceil(width / tp)`` rows (COLUMN) or columns (ROW); 1-D tensors split only COLUMN."""
    if tensor_parallel_mode is None or tensor_parallel_size <= 1:
        return weight.to(device)
    dim = TensorParallelMode.split_dim(tensor_parallel_mode)
    if weight.dim() == 1 and dim == 1:
        return weight.to(device)
    width = weight.shape[dim]
    w = math.ceil(width / tensor_parallel_size)
    return weight.narrow(dim, tensor_parallel_rank * w, min(w, width - tensor_parallel_rank * w)).to(device)




def _scalar(t) -> torch.Tensor:
    return torch.as_tensor(t).float().reshape(())


class Linear(nn.Module):

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = None,
                 mapping: Optional[Mapping] = None, tensor_parallel_mode: Optional[TensorParallelMode] = None,
                 gather_output: bool = False, quant_config: Optional[QuantConfig] = None,
                 weights_loading_config: Optional[WeightsLoadingConfig] = None, reduce_output: bool = True,
                 skip_create_weights_in_init: bool = False, use_custom_cublas_mm: bool = False, lora=None,
                 allreduce_strategy=None, force_dynamic_quantization: bool = False):
        from tensorrt_llm._torch.distributed import AllReduce

        super().__init__()
        self.has_bias, self.dtype = bias, dtype
        self.mapping = mapping or Mapping()
        self.quant_config = quant_config
        self.weights_loading_config = weights_loading_config or WeightsLoadingConfig()
        self.tp_size, self.tp_rank = self.mapping.tp_size, self.mapping.tp_rank
        self.tp_mode, self.gather_output, self.reduce_output = tensor_parallel_mode, gather_output, reduce_output
        local_in, local_out = in_features, out_features
        if self.tp_mode == TensorParallelMode.ROW:
            assert in_features % self.tp_size == 0, f"in_features {in_features} must be divisible by tp_size"
            local_in = in_features // self.tp_size
        elif self.tp_mode == TensorParallelMode.COLUMN:
            assert out_features % self.tp_size == 0, f"out_features {out_features} must be divisible by tp_size"
            local_out = out_features // self.tp_size
        self.in_features, self.out_features = local_in, local_out
        self.all_reduce = AllReduce(self.mapping) if self.tp_mode == TensorParallelMode.ROW and reduce_output \
            else None
        self.input_scale = None  # static NVFP4 activation scale (W4A4), set by load_weights
        self._weights_created = False
        if not skip_create_weights_in_init:
            self.create_weights()

    def create_weights(self):
        if self._weights_created:
            return
        self.weight = Parameter(torch.empty(self.out_features, self.in_features, dtype=self.dtype),
                                requires_grad=False)
        self.bias = Parameter(torch.empty(self.out_features, dtype=self.dtype), requires_grad=False) \
            if self.has_bias else None
        self._weights_created = True

    @property
    def _quant_algo(self):
        return None if self.quant_config is None else self.quant_config.quant_algo

    def _dense(self, w: Dict) -> torch.Tensor:
        """One checkpoint part (dict of weight / scales) -> dense fp32 [out, in] (full, unsplit)."""
        algo = self._quant_algo
        if algo == QuantAlgo.NVFP4:
            from trtllm_loop import nvfp4
            if w["weight"].dtype != torch.uint8 or w["weight_scale"].dtype != torch.float8_e4m3fn:
                raise ValueError("NVFP4LinearMethod expects packed uint8 'weight' and float8_e4m3fn 'weight_scale'")
            return nvfp4.dequantize(w["weight"], w["weight_scale"], _scalar(w["weight_scale_2"]))
        if algo == QuantAlgo.FP8:
            return w["weight"].float() * _scalar(w["weight_scale"])
        if algo is not None:
            raise NotImplementedError(f"the double implements NVFP4 and FP8 linear methods, not {algo}")
        return w["weight"].float()

    def _shared_scalar(self, weights: List[Dict], key: str) -> Optional[torch.Tensor]:
        vals = [_scalar(w[key]) for w in weights if key in w]
        if not vals:
            return None
        assert all(torch.equal(v, vals[0]) for v in vals), (
            f"The {key} should be same for all the weights")  # TRT-LLM's fused-load assertion
        return vals[0]

    def load_weights(self, weights: List[Dict]):
        mode = self.weights_loading_config.weight_mode
        n = {WeightMode.VANILLA: 1, WeightMode.FUSED_QKV_LINEAR: 3, WeightMode.FUSED_GATE_UP_LINEAR: 2}[mode]
        assert len(weights) == n, f"{mode} expects {n} weight dicts, got {len(weights)}"
        if self._quant_algo == QuantAlgo.NVFP4:  # one FP4 GEMM per fused Linear: one weight and input scale
            self._shared_scalar(weights, "weight_scale_2")
            self.input_scale = self._shared_scalar(weights, "input_scale")
        parts = [load_weight_shard(self._dense(w), self.tp_size, self.tp_rank, self.tp_mode) for w in weights]
        self.weight.data.copy_(torch.cat(parts, dim=0).to(self.weight.dtype))
        if self.bias is not None:
            b = [load_weight_shard(w["bias"], self.tp_size, self.tp_rank, self.tp_mode) for w in weights]
            self.bias.data.copy_(torch.cat(b).to(self.bias.dtype))

    def post_load_weights(self):
        """linear.py: the quantization method's post-processing after loading (nothing to do in the double)."""

    def forward(self, input: torch.Tensor, *, all_reduce_params=None, lora_params=None, layer_idx=None):
        x = input
        if self.input_scale is not None:
            from trtllm_loop import nvfp4
            x = nvfp4.fake_quant_activation(x, self.input_scale)
        bias = self.bias if self.bias is not None and (self.tp_mode != TensorParallelMode.ROW or self.tp_rank == 0) \
            else None
        out = F.linear(x, self.weight, bias)
        if self.all_reduce is not None:
            out = self.all_reduce(out, all_reduce_params=all_reduce_params)
        if self.tp_mode == TensorParallelMode.COLUMN and self.gather_output and self.tp_size > 1:
            from tensorrt_llm._torch.distributed import allgather
            out = allgather(out, self.mapping, dim=-1)
        return out
