"""Mimics ``tensorrt_llm.llmapi`` (1.2.1): ``LLM``, ``SamplingParams``, ``KvCacheConfig``, ``CudaGraphConfig``."""
from .llm import LLM, CompletionOutput, CudaGraphConfig, KvCacheConfig, RequestOutput, SamplingParams  # noqa: F401
