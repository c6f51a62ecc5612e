"""Mimics ``tensorrt_llm/layers/linear.py`` ``Linear`` (= ``ColumnLinear``) and ``RowLinear``: weight
``[out, in]`` per rank (column: out split; row: in split), ``y = x W^T`` (+ bias); column ``gather_output``
all-gathers the ranks' outputs; row all-reduces (sums) them over ``tp_group``."""
from tensorrt_llm.functional import allgather, allreduce, matmul
from tensorrt_llm.module import Module
from tensorrt_llm.parameter import Parameter


class Linear(Module):

    def __init__(self, in_features, out_features, bias=True, dtype=None, tp_group=None, tp_size=1,
                 gather_output=True, share_weight=None, strict_dtype=False, pad_lda=0, pad_ldc=0,
                 prefer_managed_weight=True, is_qkv=False):
        super().__init__()
        if out_features % tp_size:
            raise ValueError(f"out_features {out_features} is not divisible by tp_size {tp_size}")
        self.in_features, self.out_features = in_features, out_features // tp_size
        self.tp_group, self.tp_size, self.gather_output, self.is_qkv = tp_group, tp_size, gather_output, is_qkv
        self.weight = Parameter(shape=(self.out_features, self.in_features), dtype=dtype)
        self.bias = Parameter(shape=(self.out_features,), dtype=dtype) if bias else None

    def forward(self, x, lora_runtime_params=None):
        y = matmul(x, self.weight.value, transb=True)
        if self.bias is not None:
            y = y + self.bias.value
        if self.gather_output and self.tp_size > 1 and self.tp_group is not None:
            y = allgather(y, self.tp_group, gather_dim=-1)
        return y


ColumnLinear = Linear


class RowLinear(Module):

    def __init__(self, in_features, out_features, bias=True, dtype=None, tp_group=None, tp_size=1,
                 strict_dtype: bool = False, pad_lda=0, prefer_managed_weight=True, is_expert=False):
        super().__init__()
        if in_features % tp_size:
            raise ValueError(f"in_features {in_features} is not divisible by tp_size {tp_size}")
        self.in_features, self.out_features = in_features // tp_size, out_features
        self.tp_group, self.tp_size = tp_group, tp_size
        self.weight = Parameter(shape=(self.out_features, self.in_features), dtype=dtype)
        self.bias = Parameter(shape=(self.out_features,), dtype=dtype) if bias else None

    def forward(self, x, lora_runtime_params=None):
        y = matmul(x, self.weight.value, transb=True)
        if self.tp_size > 1 and self.tp_group is not None:
            y = allreduce(y, self.tp_group)
        if self.bias is not None:
            y = y + self.bias.value
        return y
