"""Mimics ``tensorrt_llm/_torch/pyexecutor/resource_manager.py`` ``KVCacheManager`` (1.2.1) on the project's paged
emulator (:class:`trtllm_loop.runtime.kv_cache.PagedKVCache`).

Reproduced: ``num_layers`` KV layers with ``num_kv_heads / tp`` heads each; per-layer windows from
``kv_cache_config.max_attention_window`` repeated as a pattern over the layers and clamped to ``max_seq_len``;
one block pool per window size (VSWA), which needs ``model_config.layer_types`` ("layer_types have to be set
correctly for VSWA"); ``layer_offsets``; ``add_dummy_requests``. The emulator's pools group the KV layers by the
loop's slot plan, so the double accepts the two-entry pattern ``[full, window]`` (or one entry) only."""
import math
from typing import List, Optional


from tensorrt_llm.bindings import DataType
from tensorrt_llm.mapping import Mapping


class KVCacheManager:

    def __init__(self, kv_cache_config, kv_cache_type, *, num_layers: int, num_kv_heads: int, head_dim: int,
                 tokens_per_block: int, max_seq_len: int, max_batch_size: int, mapping: Mapping,
                 dtype: DataType = DataType.HALF, spec_config=None, layer_mask=None, max_num_tokens: int = 8192,
                 model_config=None, max_beam_width: int = 1, **kwargs):
        from trtllm_loop.config import LoopConfig
        from trtllm_loop.runtime.kv_cache import PagedKVCache

        if max_beam_width != 1 or layer_mask is not None:
            raise NotImplementedError("the double implements beam width 1, no layer mask")
        if spec_config is not None and type(spec_config).__name__ not in ("NGramDecodingConfig",
                                                                          "DraftTargetDecodingConfig"):
            raise NotImplementedError("the double implements the linear drafters (NGram, DraftTarget) only")
        vec = [min(w, max_seq_len) for w in (kv_cache_config.max_attention_window or [max_seq_len])]
        if spec_config is not None and len(set(vec)) > 1:
            # Silently wrong on the real stack, so refused here: prepare_resources adds 1 + draft_len tokens
            # before the forward (resource_manager.py @b35ac1b); the C++ WindowBlockManager::adjustBlocksIfNeeded
            # (kvCacheManager.cpp, not in ../shared/reference) then detaches every front block the sequence is
            # W + tokens_per_block past -- counting the drafts -- so the verification step's first query reads
            # a released block, and rewind_kv_cache (removeToken) never re-attaches it.
            raise ValueError(f"speculative decoding with a sliding-window KV pool (max_attention_window {vec}): "
                             "window blocks are detached counting the draft tokens and not restored by the "
                             "rewind; keep every layer in the full pool (max_attention_window [max_seq_len])")
        self.max_draft_len = spec_config.max_draft_len if spec_config is not None else 0
        if len(set(vec)) > 1:  # VSWA (resource_manager.py @b35ac1b, KVCacheManager.__init__)
            if model_config is None:
                raise ValueError("model_config is required for VSWA (Variable Sliding Window Attention)")
            from tensorrt_llm.llmapi.llm_args import KvCacheConfig
            assert isinstance(kv_cache_config, KvCacheConfig), \
                "calculate_max_num_blocks_from_cpp only accepts KvCacheConfig"
            # calculate_max_num_blocks_from_cpp
            assert model_config.layer_types is not None, "layer_types have to be set correctly for VSWA"
            if len(vec) != 2 or vec[0] != max_seq_len or num_layers % 2:
                raise NotImplementedError(f"max_attention_window {vec}: the double implements the loop pattern "
                                          "[max_seq_len, W] over an even number of layers only")
        elif num_layers % 2:
            raise NotImplementedError("the double groups KV layers in (full, window) pairs: num_layers must be even")
        self.num_layers, self.head_dim, self.tokens_per_block = num_layers, head_dim, tokens_per_block
        self.max_seq_len, self.max_batch_size, self.mapping = max_seq_len, max_batch_size, mapping
        self.max_attention_window_vec = vec
        self.num_kv_heads_per_rank = math.ceil(num_kv_heads / mapping.tp_size)
        self.layer_offsets = {i: i for i in range(num_layers)}
        window = vec[1 % len(vec)]
        geometry = LoopConfig(num_hidden_layers=num_layers // 2, num_attention_heads=self.num_kv_heads_per_rank,
                              num_key_value_heads=self.num_kv_heads_per_rank, head_dim=head_dim,
                              hidden_size=self.num_kv_heads_per_rank * head_dim, loop_window_size=window)
        self.cache = PagedKVCache(geometry, tokens_per_block,
                                  self._blocks_per_window(kv_cache_config, window, vec, dtype), dtype.value)
        self._seqs: set = set()
        self._len: dict = {}  # request -> tokens in the cache after its last step

    def _blocks_per_window(self, kv_cache_config, window: int, vec: List[int], dtype) -> dict:
        """Blocks of each window group's pool. With ``max_gpu_total_bytes`` the VSWA budget is split between the
        window sizes by ``TRTLLM_WINDOW_SIZE_SHARES`` (ascending windows; equal shares when unset), as the C++
        ``calculateMaxNumBlocks`` does (not in ../shared/reference; shared/docs/tensorrt-llm.md), each group's
        blocks = its bytes / (its layers x tokens_per_block x 2 x KV heads x head_dim x dtype bytes). Without a
        byte budget: every sequence can hold ``max_seq_len`` tokens in both pools."""
        import os

        import torch

        generous = self.max_batch_size * (math.ceil(self.max_seq_len / self.tokens_per_block) + 1)
        budget = getattr(kv_cache_config, "max_gpu_total_bytes", 0) or 0
        if not budget:
            return {None: generous, window: generous}
        windows = sorted(set(vec))
        env = os.environ.get("TRTLLM_WINDOW_SIZE_SHARES")
        shares = [float(s) for s in env.split(",")] if env and len(windows) > 1 else [1 / len(windows)] * len(windows)
        elt = torch.empty((), dtype=dtype.value).element_size()
        per_block = (self.num_layers // len(windows)) * self.tokens_per_block * 2 * self.num_kv_heads_per_rank \
            * self.head_dim * elt
        blocks = {w: int(budget * s // per_block) for w, s in zip(windows, shares)}
        return {None if w == self.max_seq_len else w: b for w, b in blocks.items()} if len(windows) > 1 \
            else {None: blocks[windows[0]], window: blocks[windows[0]]}

    def window_of(self, layer_idx: int) -> int:
        return self.max_attention_window_vec[layer_idx % len(self.max_attention_window_vec)]

    def add_dummy_requests(self, request_ids: List[int], token_nums: Optional[List[int]] = None, is_gen=False,
                           prepare_resource: bool = True, max_num_draft_tokens: int = 0, use_mrope: bool = False,
                           max_beam_width: int = 1, num_extra_decoding_steps: int = 0):
        """Add requests and allocate the blocks of their first ``token_nums`` tokens."""
        token_nums = token_nums or [1] * len(request_ids)
        for rid, n in zip(request_ids, token_nums):
            self.cache.add_sequence(rid)
            self._seqs.add(rid)
            self.cache.prepare(rid, 0, n)
        return [None] * len(request_ids)

    def prepare_step(self, step) -> None:
        """Executor side of a step: release window blocks out of reach, allocate the step's positions."""
        for seq, past, n, _ in step.spans():
            if seq not in self._seqs:
                raise KeyError(f"request {seq} was not added to the KV cache manager")
            self.cache.trim(seq, past)
            self.cache.prepare(seq, past, n)
            self._len[seq] = past + n

    def rewind_kv_cache(self, request, rewind_len: int) -> None:
        """Drop the last ``rewind_len`` tokens (rejected drafts) of a request (takes the request id; the real
        method takes the ``LlmRequest`` and calls the C++ ``rewindKVCache``)."""
        self._len[request] -= rewind_len
        self.cache.rollback(request, self._len[request])

    def free_resources(self, request, pin_on_release: bool = False) -> None:
        """Takes the request id (the real method takes the ``LlmRequest``)."""
        self.cache.free_sequence(request)
        self._seqs.discard(request)

    def shutdown(self) -> None:
        for rid in list(self._seqs):
            self.free_resources(rid)
