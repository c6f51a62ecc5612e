"""Mimics ``tensorrt_llm/layers/attention.py`` ``KeyValueCacheParams`` and ``AttentionParams``: the per-step
inputs every ``gpt_attention`` call of a model reads (``Attention.forward`` passes them through)."""
from typing import List

from tensorrt_llm.functional import Tensor


class AttentionParams:

    def __init__(self, sequence_length: Tensor = None, context_lengths: Tensor = None,
                 host_context_lengths: Tensor = None, max_context_length: int = None,
                 host_request_types: Tensor = None, encoder_input_lengths: Tensor = None,
                 encoder_max_input_length: Tensor = None, host_runtime_perf_knobs: Tensor = None,
                 host_context_progress: Tensor = None):
        self.sequence_length, self.context_lengths = sequence_length, context_lengths
        self.host_context_lengths, self.max_context_length = host_context_lengths, max_context_length
        self.host_request_types = host_request_types
        self.host_runtime_perf_knobs, self.host_context_progress = host_runtime_perf_knobs, host_context_progress


class KeyValueCacheParams:

    def __init__(self, past_key_value: List[Tensor] = None, host_past_key_value_lengths: Tensor = None,
                 host_max_attention_window_sizes: Tensor = None, host_sink_token_length: Tensor = None,
                 kv_cache_block_offsets: Tensor = None, host_kv_cache_block_offsets: Tensor = None,
                 host_kv_cache_pool_pointers: Tensor = None, host_kv_cache_pool_mapping: Tensor = None,
                 cache_indirection: Tensor = None):
        self.past_key_value = past_key_value
        self.host_past_key_value_lengths = host_past_key_value_lengths
        self.host_max_attention_window_sizes = host_max_attention_window_sizes
        self.host_sink_token_length = host_sink_token_length
        self.kv_cache_block_offsets = kv_cache_block_offsets
        self.host_kv_cache_block_offsets = host_kv_cache_block_offsets
        self.host_kv_cache_pool_pointers = host_kv_cache_pool_pointers
        self.host_kv_cache_pool_mapping = host_kv_cache_pool_mapping
        self.cache_indirection = cache_indirection

    def get_first_past_key_value(self):
        return None if self.past_key_value is None else self.past_key_value[0]
