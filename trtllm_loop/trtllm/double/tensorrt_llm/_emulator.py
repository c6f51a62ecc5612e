"""Double-only: the attention both doubles share -- one step of TRT-LLM's attention op over the emulator's KV
pools (:class:`trtllm_loop.runtime.attention.PagedBackend`), used by the PyTorch backend's ``TrtllmAttention``
and the engine flow's ``gpt_attention`` plugin alike. Not a TensorRT-LLM module."""
from dataclasses import replace

import torch


def paged_backend(backends: dict, mgr, step, num_heads: int, num_kv_heads: int, head_dim: int, rope_theta: float,
                  dtype: torch.dtype, window: int, layer_idx: int):
    """The emulator step for one head layout and window, built once per step (``backends`` caches it): RoPE
    tables computed once, the KV cache manager's pools shared by every KV layer."""
    key = (num_heads, num_kv_heads, head_dim, rope_theta, dtype, window)
    if key not in backends:
        from trtllm_loop.runtime.attention import PagedBackend

        if (num_kv_heads, head_dim) != (mgr.num_kv_heads_per_rank, mgr.head_dim):
            raise ValueError(f"layer {layer_idx}: {num_kv_heads} KV heads x {head_dim} per rank, "
                             f"the KV cache holds {mgr.num_kv_heads_per_rank} x {mgr.head_dim}")
        cfg = replace(mgr.cache.cfg, num_attention_heads=num_heads, rope_theta=rope_theta, loop_window_size=window)
        backends[key] = PagedBackend(mgr.cache, step, cfg, dtype)
    return backends[key]


def paged_step_attend(*, mgr, request_ids, past, request_types, context_lengths, sequence_length, layer_idx: int,
                      window: int, sink: int, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                      rope_theta: float) -> torch.Tensor:
    """GPTAttention in generation-or-context packed mode: request type 0 = context (``context_lengths`` tokens of
    this chunk after ``past`` cached ones), 1 = generation (one token); contexts come first."""
    from trtllm_loop.runtime.attention import StepMetadata

    if sink:
        raise NotImplementedError("the double implements no attention sink tokens (host_sink_token_length 0)")
    if any(t not in (0, 1) for t in request_types) or list(request_types) != sorted(request_types):
        raise ValueError(f"host_request_types {list(request_types)}: context requests (0) first, then generation (1)")
    new = [c if t == 0 else 1 for t, c in zip(request_types, context_lengths)]
    if [p + n for p, n in zip(past, new)] != list(sequence_length):
        raise ValueError(f"sequence_length {list(sequence_length)} != past {list(past)} + new tokens {new}")
    if sum(new) != qkv.shape[0]:
        raise ValueError(f"qkv holds {qkv.shape[0]} tokens, the batch {sum(new)}")
    key = (tuple(request_ids), tuple(past), tuple(new))
    state = getattr(mgr, "_eager_step", None)
    if state is None or state[0] != key:  # a new step: one StepMetadata, one backend cache
        state = (key, StepMetadata(list(request_ids), list(past), new), {})
        mgr._eager_step = state
    w = min(window, mgr.max_seq_len)
    if layer_idx % 2 == 0 and w != mgr.max_seq_len:
        raise NotImplementedError(f"KV layer {layer_idx}: window {window}; the emulator pairs (full, window) layers, "
                                  "so even KV layers must be full (max_attention_window = <max_seq_len>,<W>)")
    backend = paged_backend(state[2], mgr, state[1], num_heads, num_kv_heads, head_dim, rope_theta, qkv.dtype, w,
                            layer_idx)
    return backend.attend(mgr.layer_offsets[layer_idx], qkv).reshape(qkv.shape[0], num_heads * head_dim)
