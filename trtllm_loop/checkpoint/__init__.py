"""Checkpoint readers. ``load_state_dict`` is the one entry point every runtime uses: it returns dense
HF-named weights in the requested dtype, whatever the on-disk format."""
from __future__ import annotations

from pathlib import Path

import torch

from trtllm_loop.checkpoint.hf import iter_tensors, load_hf_state_dict, weight_map  # noqa: F401


def load_state_dict(ckpt: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dense weights under the released HF names (``model.gate_projections.{i}.*`` included)."""
    return load_hf_state_dict(ckpt, dtype)
