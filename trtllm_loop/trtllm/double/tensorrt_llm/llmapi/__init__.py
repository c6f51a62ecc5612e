"""Mimics ``tensorrt_llm.llmapi`` (1.2): ``LLM``, ``SamplingParams``, ``KvCacheConfig``, ``CudaGraphConfig``."""
from .llm import LLM, CompletionOutput, RequestOutput, SamplingParams  # noqa: F401
from .llm_args import CudaGraphConfig, KvCacheConfig  # noqa: F401
