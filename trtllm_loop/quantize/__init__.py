"""Checkpoint conversion (NVFP4/BF16 -> ModelOpt FP8 or BF16), activation calibration and emulation, and the
quantized-vs-reference logits comparison behind ``eval-quant``."""
