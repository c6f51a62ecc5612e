"""Mimics ``tensorrt_llm/_torch/metadata.py`` ``KVCacheParams``."""
from dataclasses import dataclass
from typing import List, Optional


@dataclass
class KVCacheParams:
    use_cache: bool = False
    num_cached_tokens_per_seq: Optional[List[int]] = None
    block_ids_per_seq: Optional[List[list]] = None
    host_max_attention_window_sizes: Optional[object] = None
    host_sink_token_length: Optional[object] = None
