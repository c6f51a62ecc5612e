"""Mimics ``tensorrt_llm/quantization/mode.py`` ``QuantAlgo`` (1.2.1) -- only the members the loop checkpoints
can use. TRT-LLM 1.2.1 has no ``NVFP4_AWQ`` or ``W4A16_NVFP4`` member (its FP4 algos are NVFP4, W4A8_NVFP4_FP8 and
the MXFP4 ones), so those ModelOpt exports are not loadable and the double refuses them the same way."""
import enum


class QuantAlgo(str, enum.Enum):
    FP8 = "FP8"
    NVFP4 = "NVFP4"
    MIXED_PRECISION = "MIXED_PRECISION"
