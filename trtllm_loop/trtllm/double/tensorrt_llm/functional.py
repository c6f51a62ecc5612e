"""Mimics ``tensorrt_llm/functional.py``: the enums the PyTorch backend uses, and for the engine flow an
**eager** ``Tensor`` plus the few graph ops the loop's model definition calls, each computing its torch result
at once (``tensorrt_llm._common``). The double's ``Tensor`` has only the methods the real one has (no
indexing, no ``torch`` interop), so model code that would not build with real TensorRT-LLM fails here too.

``gpt_attention`` is the GPTAttention plugin on the project's paged runtime emulator: fused pre-RoPE QKV in,
NeoX RoPE inside, the step's K/V appended to KV layer ``layer_idx`` (``use_cache``; there is no read-only mode),
attention over that layer within the window the **runtime** gives it in ``host_max_attention_window_sizes
[layer_idx]`` (a build-time plugin field holds no window). The checks of the real function are mirrored."""
import enum
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

import tensorrt as trt
from tensorrt_llm._common import ITensor, default_net


class PositionEmbeddingType(enum.IntEnum):
    learned_absolute = 0
    rope_gptj = 1
    rope_gpt_neox = 2
    long_rope = 3
    alibi = 4
    alibi_with_scale = 5
    relative = 6
    chatglm = 7
    yarn = 8
    mrope = 9
    deferred = 10

    def is_rope(self) -> bool:
        return self in (self.rope_gptj, self.rope_gpt_neox, self.long_rope, self.mrope)

    def is_alibi(self) -> bool:
        return self in (self.alibi, self.alibi_with_scale)

    def is_mrope(self) -> bool:
        return self == self.mrope

    def __str__(self):
        return self.name

    @staticmethod
    def from_string(s):
        try:
            return PositionEmbeddingType[s]
        except KeyError:
            raise ValueError(f'Unsupported position embedding type: {s}')


class AttentionMaskType(enum.IntEnum):
    padding = 0
    causal = 1
    sliding_window_causal = 2
    bidirectional = 3
    bidirectionalglm = 4
    blocksparse = 5
    custom_mask = 6


class RotaryScalingType(enum.IntEnum):
    none = 0
    linear = 1
    dynamic = 2
    longrope = 3
    llama3 = 4
    yarn = 5
    mrope = 6


class AllReduceParams:
    def __init__(self, strategy=None, fusion_op=None, bias=None, residual=None, norm_weight=None, scale=None,
                 norm_pre_residual_weight=None, eps: float = 1e-06, enable_allreduce: bool = True,
                 trigger_completion_at_end: bool = True):
        self.enable_allreduce = enable_allreduce


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}


def _torch_dtype(dtype):
    if isinstance(dtype, trt.DataType):
        dtype = dtype.value
    return _TORCH_DTYPES[dtype]


class Tensor:
    """An eager network tensor: ``trt_tensor`` is an ``ITensor`` holding the torch value."""

    def __init__(self, name=None, dtype=None, shape=None, dim_range=None, is_network_input=True,
                 location=trt.TensorLocation.DEVICE, network=None, trt_tensor=None):
        self.name, self.trt_tensor, self.is_network_input = name, trt_tensor, is_network_input
        self._spec = (dtype, shape, dim_range)  # a build-time input without a value (prepare_inputs)

    def _v(self) -> torch.Tensor:
        if self.trt_tensor is None:
            raise RuntimeError(f"network input {self.name!r} has no value: the double executes eagerly; run the model "
                               "through its runtime (the builder records inputs, it does not trace them)")
        return self.trt_tensor.value

    @property
    def shape(self):
        return tuple(self._v().shape)

    @property
    def dtype(self):
        return self._v().dtype

    def mark_output(self, name=None, dtype=None):
        default_net().outputs[name or self.name] = self

    def __add__(self, b):
        return _wrap(self._v() + _val(b))

    __radd__ = __add__

    def __sub__(self, b):
        return _wrap(self._v() - _val(b))

    def __rsub__(self, b):
        return _wrap(_val(b) - self._v())

    def __mul__(self, b):
        return _wrap(self._v() * _val(b))

    __rmul__ = __mul__

    def __truediv__(self, b):
        return _wrap(self._v() / _val(b))

    def view(self, shape, zero_is_placeholder=True):
        return view(self, shape, zero_is_placeholder)

    def split(self, split_size_or_sections, dim=0):
        return split(self, split_size_or_sections, dim)

    def unsqueeze(self, dim):
        return unsqueeze(self, dim)

    def cast(self, dtype):
        return cast(self, dtype)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def ndim(self):
        return len(self.shape)


def _wrap(value) -> Tensor:
    return Tensor(trt_tensor=ITensor(value), is_network_input=False)


def _val(x):
    return x._v() if isinstance(x, Tensor) else x


def _create_tensor(trt_tensor, producer) -> Tensor:
    assert trt_tensor is not None
    assert producer is not None
    return Tensor(name=trt_tensor.name, trt_tensor=trt_tensor, is_network_input=False)


def constant(ndarray: np.ndarray, as_dtype=None, as_shape=None) -> Tensor:
    t = torch.as_tensor(ndarray) if not isinstance(ndarray, torch.Tensor) else ndarray
    return _wrap(t if as_shape is None else t.reshape(as_shape))


def cast(input: Tensor, dtype: Union[str, trt.DataType]):
    return _wrap(input._v().to(_torch_dtype(dtype)))


def shape(input: Tensor, dim: Optional[int] = None, cast_to_dtype=None, clip_before_cast: Sequence[int] = None) -> Tensor:
    s = torch.tensor(input.shape, dtype=torch.int64)
    return _wrap(s if dim is None else s[dim])


def concat(inputs: Sequence[Union[Tensor, int]], dim: int = 0) -> Tensor:
    if any(isinstance(i, int) for i in inputs):  # a shape: ints and 0-d/1-d shape tensors
        return _wrap(torch.cat([torch.as_tensor(_val(i), dtype=torch.int64).reshape(-1) for i in inputs]))
    return _wrap(torch.cat([i._v() for i in inputs], dim=dim))


def split(tensor: Tensor, split_size_or_sections: Union[int, Sequence[int]], dim: int = 0) -> Sequence[Tensor]:
    return [_wrap(t) for t in torch.split(tensor._v(), split_size_or_sections, dim=dim)]


def view(input: Tensor, shape: Union[Tensor, Sequence[int]], zero_is_placeholder: bool = True) -> Tensor:
    dims = [int(d) for d in (_val(shape).tolist() if isinstance(shape, Tensor) else shape)]
    return _wrap(input._v().reshape(dims))


def unsqueeze(input: Tensor, axis: int):
    return _wrap(input._v().unsqueeze(axis))


def sum(input: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    return _wrap(input._v().sum(dim, keepdim=keepdim))


def silu(input: Tensor) -> Tensor:
    return _wrap(F.silu(input._v()))


def _sigmoid(input: Tensor) -> Tensor:
    return _wrap(torch.sigmoid(input._v()))


sigmoid = _sigmoid  # real: partial(activation, act_type=trt.ActivationType.SIGMOID)


def matmul(input: Tensor, mat2: Tensor, transa: bool = False, transb: bool = False, use_fp32_acc: bool = True) -> Tensor:
    a, b = input._v(), mat2._v()
    if transa:
        a = a.transpose(-1, -2)
    return _wrap(F.linear(a, b) if transb and b.dim() == 2 else torch.matmul(a, b.transpose(-1, -2) if transb else b))


def embedding(input: Tensor, weight: Tensor, tp_size=1, tp_group=None, sharding_dim=0, tp_rank=None,
              per_token_scale=None, padding=None) -> Tensor:
    if tp_size > 1:
        raise NotImplementedError("the double implements a replicated embedding table only (use_parallel_embedding "
                                  "off)")
    return _wrap(F.embedding(input._v().long(), weight._v()))


def rms_norm(input: Tensor, normalized_shape: Union[int, Tuple[int]], num_groups: int = 1,
             weight: Optional[Tensor] = None, eps: float = 1e-06) -> Tensor:
    from trtllm_loop.modeling.ops import rms_norm as ref  # fp32 statistics, cast back, times weight

    x = input._v()
    return _wrap(ref(x, weight._v() if weight is not None else torch.ones(x.shape[-1], dtype=x.dtype), eps))


def _world(group: List[int]):
    from tensorrt_llm._torch.distributed import _WORLD

    if len(group) == 1:
        return None
    if _WORLD is None or _WORLD.tp_size != len(group):
        raise RuntimeError(f"a collective over {len(group)} ranks needs a running SimulatedWorld of that size")
    return _WORLD


def _rank() -> int:
    import threading

    name = threading.current_thread().name
    return int(name.rsplit("-", 1)[1]) if name.startswith("tp-rank-") else 0


def allreduce(tensor: Tensor, group: List[int], all_reduce_params: Optional[AllReduceParams] = None) -> Tensor:
    w = _world(group)
    return tensor if w is None else _wrap(w.all_reduce(_rank(), tensor._v()))


def allgather(tensor: Tensor, group: List[int], gather_dim: int = 0) -> Tensor:
    w = _world(group)
    return tensor if w is None else _wrap(w.all_gather(_rank(), tensor._v(), gather_dim))


def gather_last_token_logits(hidden_states: Tensor, last_token_ids: Tensor, remove_input_padding: bool) -> Tensor:
    if last_token_ids is None:
        return hidden_states
    if not remove_input_padding:
        raise NotImplementedError("the double implements packed (remove_input_padding) inputs only")
    return _wrap(hidden_states._v()[last_token_ids._v().long() - 1])


def gpt_attention(*, qkv: Tensor, past_key_value: Tensor, attention_mask: Optional[Tensor] = None,
                  attention_packed_mask: Optional[Tensor] = None, sequence_length: Tensor,
                  host_past_key_value_lengths: Optional[Tensor], host_max_attention_window_sizes: Tensor,
                  host_sink_token_length: Tensor, context_lengths: Optional[Tensor],
                  cache_indirection: Optional[Tensor], host_request_types: Tensor, layer_idx: int, num_heads: int,
                  num_kv_heads: int, hidden_size_per_head: int, q_scaling: float, rotary_embedding_dim: int = 0,
                  rotary_embedding_base: float = 10000.0,
                  rotary_embedding_scale_type: RotaryScalingType = RotaryScalingType.none,
                  rotary_embedding_scale: float = 1.0, rotary_embedding_max_positions: int = 1024,
                  position_embedding_type: PositionEmbeddingType = PositionEmbeddingType.learned_absolute,
                  rotary_inv_freq: Optional[Tensor] = None, rotary_cos_sin: Optional[Tensor] = None,
                  kv_cache_quant_mode=None, max_context_length: Optional[int] = None,
                  mask_type: AttentionMaskType = AttentionMaskType.causal, tp_size: int = 1, tp_rank: int = 0,
                  kv_cache_block_offsets: Optional[Tensor] = None, host_kv_cache_block_offsets: Tensor = None,
                  host_kv_cache_pool_pointers: Tensor = None, host_kv_cache_pool_mapping: Tensor = None,
                  host_context_lengths: Optional[Tensor] = None, use_cache: bool = True,
                  num_kv_heads_origin: int = -1) -> Tuple[Tensor, Optional[Tensor]]:
    """The GPTAttention plugin. The double's paged-KV handles: ``host_kv_cache_pool_pointers`` holds the
    emulator's KV cache manager, ``host_kv_cache_block_offsets`` each batch entry's request id (the emulator
    owns the block tables)."""
    net = default_net()
    # functional.py gpt_attention: the same asserts, in the same order
    assert host_request_types is not None
    assert (position_embedding_type.is_alibi()) is False, "the double implements RoPE models only"
    assert host_context_lengths is not None or not net.plugin_config.remove_input_padding
    assert isinstance(max_context_length, int)
    assert host_max_attention_window_sizes is not None
    assert host_sink_token_length is not None
    paged = net.plugin_config.paged_kv_cache
    if use_cache and paged:
        assert kv_cache_block_offsets is not None, "Paged kv cache is enabled, the kv_cache_block_offsets tensor shall not be None"
        assert host_kv_cache_block_offsets is not None, "Paged kv cache is enabled, the host_kv_cache_block_offsets tensor shall not be None"
        assert host_kv_cache_pool_pointers is not None, "Paged kv cache is enabled, the host_kv_cache_pool_pointers tensor shall not be None"
        assert host_kv_cache_pool_mapping is not None, "Paged kv cache is enabled, the host_kv_cache_pool_mapping tensor shall not be None"
    # what the double implements
    if not (use_cache and paged and net.plugin_config.remove_input_padding):
        raise NotImplementedError("the double implements the paged KV cache with packed inputs only")
    if position_embedding_type != PositionEmbeddingType.rope_gpt_neox or rotary_embedding_dim != hidden_size_per_head \
            or rotary_embedding_scale_type != RotaryScalingType.none:
        raise NotImplementedError("the double implements full-dimension, unscaled NeoX (rotate-half) RoPE only")
    if q_scaling != 1.0 or mask_type != AttentionMaskType.causal or attention_mask is not None:
        raise NotImplementedError("the double implements causal attention with 1/sqrt(head_dim) scaling only")
    if getattr(kv_cache_quant_mode, "has_kv_cache_quant", lambda: False)():
        raise NotImplementedError("the double stores K/V in the activation dtype (no FP8/INT8 KV cache)")
    from tensorrt_llm._emulator import paged_step_attend

    out = paged_step_attend(
        mgr=host_kv_cache_pool_pointers._v(), request_ids=host_kv_cache_block_offsets._v().tolist(),
        past=host_past_key_value_lengths._v().tolist(), request_types=host_request_types._v().tolist(),
        context_lengths=host_context_lengths._v().tolist(), sequence_length=sequence_length._v().tolist(),
        layer_idx=layer_idx, window=int(host_max_attention_window_sizes._v()[layer_idx]),
        sink=int(host_sink_token_length._v().reshape(-1)[0]), qkv=qkv._v(), num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=hidden_size_per_head, rope_theta=rotary_embedding_base)
    return _wrap(out), None


def _add_plugin_info(layer, plugin_creator, plugin_name: str, pfc) -> None:
    """Records plugin info for graph rewriting upstream; the double's network records plugin layers itself."""


class RopeEmbeddingUtils:

    @staticmethod
    def create_sinusoidal_positions_for_attention_plugin(num_pos: int, dim: int, theta: float = 10000.0,
                                                         scale: float = 1.0,
                                                         scale_type: RotaryScalingType = RotaryScalingType.none,
                                                         rope_scaling_config: dict = None, dtype=np.float32):
        """(inv_freq ``[dim/2]``, fused (cos, sin) table ``[1, num_pos * dim]``), unscaled only."""
        if scale_type != RotaryScalingType.none or scale != 1.0:
            raise NotImplementedError("the double implements unscaled RoPE only")
        inv_freq = scale / (theta ** (np.arange(0, dim, 2) / dim)).astype(dtype)
        sinusoid_inp = np.expand_dims(np.einsum("i , j -> i j", np.arange(num_pos, dtype=dtype), inv_freq,
                                                dtype=dtype), axis=-1)
        concat = np.concatenate((np.cos(sinusoid_inp), np.sin(sinusoid_inp)), axis=-1)
        return inv_freq, concat.reshape(1, -1).astype(dtype)
