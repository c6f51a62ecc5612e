"""Streaming reader for HF-layout safetensors checkpoints (``model.safetensors`` or a sharded
``model.safetensors.index.json``). One tensor at a time; nothing is read until asked for."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from trtllm_loop.checkpoint.safetensors_io import TensorInfo, read_header, read_tensor
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
        return {name: ckpt / SINGLE for name in read_header(ckpt / SINGLE)[0]}
    raise UserError(f"{ckpt}: no {SINGLE} or {INDEX}; expected an HF-layout checkpoint directory")


def tensor_index(ckpt: str | Path) -> dict[str, TensorInfo]:
    """name -> :class:`TensorInfo` (file, dtype, shape, byte range) for every tensor, from the shard headers.
    Raises if a tensor the index lists is absent from its shard, or a shard is truncated."""
    wm = weight_map(ckpt)
    headers: dict[Path, dict[str, TensorInfo]] = {}
    out = {}
    for name, shard in wm.items():
        if shard not in headers:
            headers[shard] = read_header(shard)[0]
        info = headers[shard].get(name)
        if info is None:
            raise UserError(f"{shard}: tensor {name!r} is listed in {INDEX} but not stored in this shard; the "
                            "index and shards come from different exports, copy the complete checkpoint again")
        out[name] = info
    return out


def unindexed_tensors(ckpt: str | Path) -> dict[str, Path]:
    """Tensors stored in a ``*.safetensors`` file of a sharded checkpoint but absent from its index."""
    ckpt = Path(ckpt)
    if not (ckpt / INDEX).is_file():
        return {}
    wm = weight_map(ckpt)
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        for name in read_header(f)[0]:
            if name not in wm:
                out[name] = f
    return out


def iter_tensors(ckpt: str | Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` shard by shard, one tensor at a time (in file order for locality)."""
    idx = tensor_index(ckpt)
    names = list(idx) if names is None else names
    for n in names:
        if n not in idx:
            raise UserError(f"{ckpt}: tensor {n!r} is not in the checkpoint")
    for n in sorted(names, key=lambda n: (str(idx[n].file), idx[n].start)):
        yield n, read_tensor(idx[n])

