"""Mimics ``tensorrt_llm/quantization/layers.py`` ``FP4Linear`` / ``FP4RowLinear`` (NVFP4, engine flow): the
parameters ``weight``, ``weights_block_scaling_factor`` (FP8 ``[out, in/16]``), its 128x4-interleaved copy for the
NVFP4 GEMM plugin, ``weights_global_scaling_factor``, ``activation_global_scaling_factor`` and ``alpha``.

The double stores ``weight`` as the packed bytes (uint8 ``[out, in/2]``; real: ``trt.fp4`` ``[out, in]``) and
runs the W4A4 GEMM as its emulation: the input quantized to NVFP4 under ``activation_global_scaling_factor``
(:func:`trtllm_loop.nvfp4.fake_quant_activation`), times the weight dequantized from the **interleaved** block
scales (what the ``nvfp4`` GEMM plugin reads, so a wrong interleave shows) and the global scale."""
import torch

from tensorrt_llm.functional import _wrap, allgather, allreduce
from tensorrt_llm.layers.linear import Linear, RowLinear
from tensorrt_llm.parameter import Parameter


def _fp4_params(layer) -> None:
    out_f, in_f = layer.out_features, layer.in_features
    assert in_f % 16 == 0, "Input features must be a multiple of 16 for FP4 GEMM"
    layer.weight = Parameter(shape=(out_f, in_f // 2), dtype=torch.uint8)
    layer.weights_block_scaling_factor = Parameter(shape=(out_f, in_f // 16), dtype=torch.float8_e4m3fn)
    layer.weights_block_scaling_factor_interleaved = Parameter(
        shape=(-(-out_f // 128) * 128, -(-(in_f // 16) // 4) * 4), dtype=torch.float8_e4m3fn)
    layer.weights_global_scaling_factor = Parameter(shape=(1,), dtype=torch.float32)
    layer.activation_global_scaling_factor = Parameter(shape=(1,), dtype=torch.float32)
    layer.alpha = Parameter(shape=(1,), dtype=torch.float32)


def _fp4_gemm(layer, x):
    from trtllm_loop import nvfp4

    if getattr(layer, "_dense", None) is None:
        n, kb = layer.out_features, layer.in_features // 16
        scale = nvfp4.unswizzle_block_scale(layer.weights_block_scaling_factor_interleaved.raw_value.reshape(-1), n, kb)
        layer._dense = nvfp4.dequantize(layer.weight.raw_value, scale,
                                        layer.weights_global_scaling_factor.raw_value.reshape(()))
    v = x._v()
    q = nvfp4.fake_quant_activation(v, layer.activation_global_scaling_factor.raw_value.reshape(()))
    return _wrap(torch.nn.functional.linear(q, layer._dense.to(v.dtype)))


class FP4Linear(Linear):

    def __init__(self, in_features, out_features, bias=True, dtype=None, tp_group=None, tp_size=1,
                 gather_output=True, prefer_managed_weight=True, is_qkv=False):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, tp_group=tp_group, tp_size=tp_size,
                         gather_output=gather_output, prefer_managed_weight=prefer_managed_weight, is_qkv=is_qkv)
        _fp4_params(self)

    def forward(self, x, lora_runtime_params=None):
        assert lora_runtime_params is None, "lora is not supported on FP4Linear now"
        y = _fp4_gemm(self, x)
        if self.bias is not None:
            y = y + self.bias.value
        if self.gather_output and self.tp_size > 1 and self.tp_group is not None:
            y = allgather(y, self.tp_group, gather_dim=-1)
        return y


class FP4RowLinear(RowLinear):

    def __init__(self, in_features, out_features, bias=True, dtype=None, tp_group=None, tp_size=1):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, tp_group=tp_group, tp_size=tp_size)
        _fp4_params(self)

    def forward(self, x, lora_runtime_params=None):
        assert lora_runtime_params is None, "lora is not supported on FP4RowLinear now"
        y = _fp4_gemm(self, x)
        if self.tp_size > 1 and self.tp_group is not None:
            y = allreduce(y, self.tp_group)
        if self.bias is not None:
            y = y + self.bias.value
        return y
