"""Mimics ``tensorrt_llm/_torch/attention_backend/trtllm.py`` (1.2.1) ``TrtllmAttention`` on the project's paged
runtime emulator (:class:`trtllm_loop.runtime.attention.PagedBackend`).

Behaviour reproduced from the C++ op (``cpp/tensorrt_llm/thop/attentionOp.cpp``): fused pre-RoPE QKV in only
("Only fused QKV is supported for non-MLA attention now"), NeoX RoPE applied inside at each token's position,
the step's K/V **appended** to KV layer ``layer_idx`` ("KV cache update cannot be disabled now"), then causal
attention over that layer, limited to the last ``attention_window_size`` keys including the current one. Two
backend objects with the same ``layer_idx`` read and write the same cache layer."""
from dataclasses import dataclass, replace
from typing import Optional

import torch

from tensorrt_llm.functional import PositionEmbeddingType

from .interface import AttentionBackend, AttentionMetadata, PositionalEmbeddingParams, PredefinedAttentionMask


@dataclass(kw_only=True)
class TrtllmAttentionMetadata(AttentionMetadata):

    def prepare(self):
        """Host side of a step: check the batch layout, allocate/release blocks, build the emulator's step."""
        from trtllm_loop.runtime.attention import StepMetadata

        new = [int(n) for n in self.seq_lens.tolist()]
        past = list(self.kv_cache_params.num_cached_tokens_per_seq) if self.kv_cache_params else [0] * len(new)
        if any(n != 1 for n in new[self.num_contexts:]):
            raise ValueError("generation requests carry exactly one token (no speculative decoding in the double)")
        if sum(new) > self.max_num_tokens or len(new) > self.max_num_requests:
            raise ValueError(f"batch of {len(new)} requests / {sum(new)} tokens exceeds max_num_requests "
                             f"{self.max_num_requests} / max_num_tokens {self.max_num_tokens}")
        self.step = StepMetadata(list(self.request_ids), past, new)
        self.kv_cache_manager.prepare_step(self.step)
        self._backends = {}


class TrtllmAttention(AttentionBackend[TrtllmAttentionMetadata]):
    Metadata = TrtllmAttentionMetadata

    def __init__(self, layer_idx: int, num_heads: int, head_dim: int, num_kv_heads: Optional[int] = None,
                 quant_config=None, q_scaling: Optional[float] = None,
                 pos_embd_params: Optional[PositionalEmbeddingParams] = None, **kwargs):
        super().__init__(layer_idx, num_heads, head_dim, num_kv_heads, quant_config)
        if q_scaling not in (None, 1.0):
            raise NotImplementedError("the double implements the default 1/sqrt(head_dim) scaling only")
        if pos_embd_params is None or pos_embd_params.type != PositionEmbeddingType.rope_gpt_neox:
            raise NotImplementedError("the double implements fused NeoX (rotate-half) RoPE only")
        self.rope_theta = pos_embd_params.rope.theta

    def _paged(self, metadata: TrtllmAttentionMetadata, dtype: torch.dtype):
        """One emulator step per (metadata, head layout): RoPE tables computed once per step."""
        from trtllm_loop.runtime.attention import PagedBackend

        key = (self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta, dtype)
        if key not in metadata._backends:
            mgr = metadata.kv_cache_manager
            if (self.num_kv_heads, self.head_dim) != (mgr.num_kv_heads_per_rank, mgr.head_dim):
                raise ValueError(f"layer {self.layer_idx}: {self.num_kv_heads} KV heads x {self.head_dim} per rank, "
                                 f"the KV cache holds {mgr.num_kv_heads_per_rank} x {mgr.head_dim}")
            cfg = replace(mgr.cache.cfg, num_attention_heads=self.num_heads, rope_theta=self.rope_theta)
            metadata._backends[key] = PagedBackend(mgr.cache, metadata.step, cfg, dtype)
        return metadata._backends[key]

    def forward(self, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
                metadata: TrtllmAttentionMetadata, out_scale=None, *,
                attention_mask=PredefinedAttentionMask.CAUSAL, attention_window_size: Optional[int] = None,
                **kwargs) -> torch.Tensor:
        if k is not None or v is not None:
            raise ValueError("Only fused QKV is supported for non-MLA attention now")
        if out_scale is not None:
            raise NotImplementedError("the double does not emulate quantized (FP8/NVFP4) attention output")
        if attention_mask != PredefinedAttentionMask.CAUSAL:
            raise NotImplementedError("the double implements causal attention only")
        mgr = metadata.kv_cache_manager
        slot = mgr.layer_offsets[self.layer_idx]
        kv_window = mgr.window_of(slot)
        window = attention_window_size if attention_window_size is not None else mgr.max_seq_len
        if min(window, mgr.max_seq_len) != kv_window:
            # the real kernel would silently attend over a window its cache blocks do not hold
            raise ValueError(f"layer {self.layer_idx}: attention_window_size {attention_window_size} disagrees with "
                             f"the KV cache's max_attention_window {kv_window} for this layer")
        out = self._paged(metadata, q.dtype).attend(slot, q)  # the cache's window for this layer, checked above
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
