"""Mimics ``tensorrt_llm.bindings.internal.batch_manager.CacheType``."""
import enum


class CacheType(enum.Enum):
    SELF = 0
    CROSS = 1
