"""Checkpoint readers. :func:`load_checkpoint` is the one reader behind every runtime (the model loader
``trtllm_loop.modeling.load.load_model`` calls it): dense HF-named weights in the requested dtype, whatever the
on-disk format (dense HF, ModelOpt NVFP4 / NVFP4_AWQ / W4A16_NVFP4 / FP8, compressed-tensors NVFP4 / NVFP4A16),
plus the static activation and KV scales. :func:`load_state_dict` is its dense-weights-only shorthand.
The TensorRT-LLM adapter reads the tensors as stored (:func:`iter_tensors`): TRT-LLM dequantizes itself."""
from __future__ import annotations

from pathlib import Path

import torch

from trtllm_loop.checkpoint.dequant import LoadedCheckpoint, load_checkpoint  # noqa: F401
from trtllm_loop.checkpoint.formats import QuantInfo, detect_format  # noqa: F401
from trtllm_loop.checkpoint.hf import iter_tensors, tensor_index, weight_map  # noqa: F401


def load_state_dict(ckpt: str | Path, dtype: torch.dtype = torch.float32, *, return_input_scales: bool = False):
    """Dense weights under the released HF names (``model.gate_projections.{i}.*`` included).

    With ``return_input_scales=True`` returns ``(state_dict, input_scales)`` where ``input_scales`` maps a Linear's
    module name (e.g. ``model.layers.0.self_attn.q_proj``) to its static W4A4 activation scale, an fp32 0-d tensor
    in the ModelOpt meaning (amax / 2688), for :func:`trtllm_loop.nvfp4.fake_quant_activation`. It is empty for
    weight-only and dense checkpoints. NVFP4_AWQ ``pre_quant_scale`` is folded into the dense weight; use
    :func:`load_checkpoint` to get it (and the FP8 KV scales) separately.
    """
    ck = load_checkpoint(ckpt, dtype)
    return (ck.state_dict, ck.input_scales) if return_input_scales else ck.state_dict


def describe_checkpoint(ckpt: str | Path) -> dict:
    """Format summary for ``inspect``: format, quant algo, group size, KV cache quant, excluded modules,
    per-kind module counts, KV scales present, and validation findings (level, file, tensor, message)."""
    from trtllm_loop.checkpoint.describe import describe
    return describe(ckpt)


def describe_lines(d: dict) -> list[str]:
    """Text lines for a :func:`describe_checkpoint` dict (format, KV quant, module kinds, exclusions, findings)."""
    from trtllm_loop.checkpoint.describe import describe_lines as lines
    return lines(d)
