"""Mimics the C++ binding enums ``tensorrt_llm.bindings.DataType`` and ``LayerType``."""
import enum

import torch


class DataType(enum.Enum):
    FLOAT = torch.float32
    HALF = torch.float16
    BF16 = torch.bfloat16
    FP8 = torch.float8_e4m3fn


class LayerType(enum.Enum):
    ATTENTION = 0
    RECURRENT = 1
    LINEAR = 2
    NOOP = 3
