"""Mimics ``tensorrt_llm/quantization/mode.py`` ``QuantAlgo`` (the values the loop checkpoints use)."""
import enum


class QuantAlgo(str, enum.Enum):
    FP8 = "FP8"
    NVFP4 = "NVFP4"
    NVFP4_AWQ = "NVFP4_AWQ"
    W4A16_NVFP4 = "W4A16_NVFP4"
    MIXED_PRECISION = "MIXED_PRECISION"
