"""Paged runtime emulator: the attention contract the TensorRT-LLM adapters follow, in plain PyTorch."""
from trtllm_loop.runtime.attention import PagedBackend, StepMetadata
from trtllm_loop.runtime.scheduler import LoopRuntime, StepOutput
from trtllm_loop.runtime.kv_cache import CacheFullError, PagedKVCache
from trtllm_loop.runtime.sampling import SamplingParams

__all__ = ["LoopRuntime", "StepOutput", "SamplingParams", "PagedKVCache", "CacheFullError", "PagedBackend",
           "StepMetadata"]
