"""Mimics ``tensorrt_llm/_torch/attention_backend/trtllm.py`` (reference commit in ../shared/reference/MANIFEST.md)
``TrtllmAttention`` on the project's paged runtime emulator (:class:`trtllm_loop.runtime.attention.PagedBackend`).

Behaviour reproduced from the C++ op (``cpp/tensorrt_llm/thop/attentionOp.cpp``): fused pre-RoPE QKV in only
("Only fused QKV is supported for non-MLA attention now"), NeoX RoPE applied inside at each token's position,
the step's K/V **appended** to KV layer ``layer_idx`` ("KV cache update cannot be disabled now"), then causal
attention over that layer, limited to the last ``attention_window_size`` keys including the current one. Two
backend objects with the same ``layer_idx`` read and write the same cache layer.

Mirrored from ``TrtllmAttention.forward`` / ``TrtllmAttentionWrapper.plan``:

* the parameter order of ``forward`` (``out_scale``, ``out_scale_sf``, ... positional; the rest keyword-only);
* ``attention_window_size or max_sequence_length`` (``plan``): a window that disagrees with the KV cache's
  ``max_attention_window`` is **not** an error there -- the kernel silently attends over the window it was
  given; the double does the same (over the keys its cache holds) and records the mismatch in
  ``metadata.window_mismatches`` so tests can show the adapter never relies on it;
* ``use_paged_context_fmha = chunked_prefill or cache_reuse or has_speculative_draft_tokens`` (from
  ``metadata.runtime_features``): without it a context chunk after the first does not read the earlier chunks
  from the cache (wrong numbers on real hardware, SM90 aside); the double refuses that step instead, so CI
  catches it;
* with an NVFP4 ``quant_config`` and ``enable_attn_nvfp4_output=True`` (the default) the real op returns
  ``(output, output_sf)`` with NVFP4 output; the double returns a tuple there too."""
from dataclasses import dataclass
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
        rf = self.runtime_features
        if any(n != 1 for n in new[self.num_contexts:]) and not (rf and rf.has_speculative_draft_tokens):
            # model_engine.py @0249976: a generation request carries 1 + its draft tokens only when the executor
            # runs a drafter (py_executor_creator.py: has_speculative_draft_tokens=has_draft_model_engine or
            # has_spec_drafter); without one, several tokens would be a context the metadata does not declare
            raise ValueError("generation requests carry one token, or 1 + draft tokens with "
                             "runtime_features.has_speculative_draft_tokens (a drafter)")
        if sum(new) > self.max_num_tokens or len(new) > self.max_num_requests:
            raise ValueError(f"batch of {len(new)} requests / {sum(new)} tokens exceeds max_num_requests "
                             f"{self.max_num_requests} / max_num_tokens {self.max_num_tokens}")
        self.step = StepMetadata(list(self.request_ids), past, new)
        self.kv_cache_manager.prepare_step(self.step)
        self._backends = {}
        self.window_mismatches = []


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
        algo = getattr(quant_config, "quant_algo", None)
        self.has_nvfp4 = algo is not None and getattr(algo, "value", algo) == "NVFP4"

    def _paged(self, metadata: TrtllmAttentionMetadata, dtype: torch.dtype, window: int):
        """One emulator step per (metadata, head layout, window): RoPE tables computed once per step."""
        from tensorrt_llm._emulator import paged_backend

        return paged_backend(metadata._backends, metadata.kv_cache_manager, metadata.step, self.num_heads,
                             self.num_kv_heads, self.head_dim, self.rope_theta, dtype, window, self.layer_idx)

    def forward(self, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
                metadata: TrtllmAttentionMetadata, out_scale=None, out_scale_sf=None, kv_scales_sf=None,
                kv_scales_sf_inv=None, *, attention_mask=PredefinedAttentionMask.CAUSAL,
                attention_window_size: Optional[int] = None, enable_attn_nvfp4_output: bool = True,
                output: Optional[torch.Tensor] = None, output_sf: Optional[torch.Tensor] = None, **kwargs):
        assert isinstance(metadata, TrtllmAttentionMetadata)
        if k is not None or v is not None:
            raise ValueError("Only fused QKV is supported for non-MLA attention now")
        if out_scale is not None:
            raise NotImplementedError("the double does not emulate quantized (FP8/NVFP4) attention output")
        if attention_mask != PredefinedAttentionMask.CAUSAL:
            raise NotImplementedError("the double implements causal attention only")
        rf = metadata.runtime_features
        paged_context_fmha = bool(rf and (rf.chunked_prefill or rf.cache_reuse or rf.has_speculative_draft_tokens))
        if not paged_context_fmha and any(p > 0 for p in metadata.step.past[:metadata.num_contexts]):
            raise ValueError("a context chunk after the first, without paged context FMHA: TRT-LLM's kernel would "
                             "not attend over the earlier chunks (set metadata.runtime_features.chunked_prefill, "
                             "as the PyExecutor does when enable_chunked_prefill is on)")
        mgr = metadata.kv_cache_manager
        slot = mgr.layer_offsets[self.layer_idx]
        kv_window = mgr.window_of(slot)
        # TrtllmAttentionWrapper.plan: `attention_window_size or max_sequence_length`, never checked against the
        # cache: silently wrong when it disagrees
        window = attention_window_size or mgr.max_seq_len
        if min(window, mgr.max_seq_len) != kv_window:
            metadata.window_mismatches.append((self.layer_idx, attention_window_size, kv_window))
        paged = self._paged(metadata, q.dtype, min(window, mgr.max_seq_len))
        out = paged.attend(slot, q).reshape(q.shape[0], self.num_heads * self.head_dim)
        if output is not None:
            output.copy_(out)
            out = output
        if enable_attn_nvfp4_output and self.has_nvfp4:
            return out, None  # real: (NVFP4 output, its scale factors)
        return out
