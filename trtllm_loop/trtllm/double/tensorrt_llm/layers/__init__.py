"""Mimics ``tensorrt_llm/layers`` (the engine-flow layers the loop model uses; see linear.py, attention.py)."""
from tensorrt_llm.layers.attention import AttentionParams, KeyValueCacheParams  # noqa: F401
from tensorrt_llm.layers.linear import ColumnLinear, Linear, RowLinear  # noqa: F401
