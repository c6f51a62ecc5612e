"""Streaming reader for HF-layout safetensors checkpoints (``model.safetensors`` or a sharded
``model.safetensors.index.json``). One tensor at a time; nothing is read until asked for."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from trtllm_loop.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def weight_map(ckpt: str | Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index or from the single-file header."""
    ckpt = Path(ckpt)
    if (ckpt / INDEX).is_file():
        try:
            idx = json.loads((ckpt / INDEX).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{ckpt / INDEX}: not valid JSON ({e})") from None
        wm = idx.get("weight_map")
        if not isinstance(wm, dict):
            raise UserError(f"{ckpt / INDEX}: has no 'weight_map' object; re-export the checkpoint")
        out = {}
        for name, shard in wm.items():
            f = ckpt / shard
            if not f.is_file():
                raise UserError(f"{f}: shard listed in {INDEX} for tensor {name!r} is missing; "
                                "download or copy the complete checkpoint")
            out[name] = f
        return out
    if (ckpt / SINGLE).is_file():
        with _open(ckpt / SINGLE) as f:
            return {name: ckpt / SINGLE for name in f.keys()}
    raise UserError(f"{ckpt}: no {SINGLE} or {INDEX}; expected an HF-layout checkpoint directory")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
        raise UserError(f"{path}: cannot read safetensors file ({e}); the file is truncated or corrupt, "
                        "copy it again") from None


def iter_tensors(ckpt: str | Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` shard by shard, one tensor at a time (sorted by shard for locality)."""
    wm = weight_map(ckpt)
    names = sorted(wm) if names is None else names
    by_shard: dict[Path, list[str]] = {}
    for n in names:
        if n not in wm:
            raise UserError(f"{ckpt}: tensor {n!r} is not in the checkpoint")
        by_shard.setdefault(wm[n], []).append(n)
    for shard, ns in sorted(by_shard.items()):
        with _open(shard) as f:
            for n in ns:
                try:
                    t = f.get_tensor(n)
                except Exception as e:
                    raise UserError(f"{shard}: tensor {n!r} cannot be read ({e}); the shard is truncated or "
                                    "corrupt, copy it again") from None
                yield n, t


def load_hf_state_dict(ckpt: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in iter_tensors(ckpt)}
