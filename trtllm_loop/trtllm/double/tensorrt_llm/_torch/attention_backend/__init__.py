"""Mimics ``tensorrt_llm/_torch/attention_backend/__init__.py``."""
from .interface import AttentionBackend, AttentionMetadata  # noqa: F401
from .trtllm import TrtllmAttention, TrtllmAttentionMetadata  # noqa: F401
