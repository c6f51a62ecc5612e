"""Mimics ``tensorrt_llm.bindings.executor.KvCacheConfig`` (the C++ config ``KVCacheManager`` takes)."""


class KvCacheConfig:
    def __init__(self, enable_block_reuse=True, max_tokens=None, max_attention_window=None, sink_token_length=None,
                 free_gpu_memory_fraction=None, host_cache_size=None, onboard_blocks=True, **kwargs):
        self.enable_block_reuse = enable_block_reuse
        self.max_tokens = max_tokens
        self.max_attention_window = None if max_attention_window is None else list(max_attention_window)
        self.free_gpu_memory_fraction = free_gpu_memory_fraction
        self.host_cache_size = host_cache_size
