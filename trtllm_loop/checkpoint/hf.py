"""Streaming reader for HF-layout safetensors checkpoints (``model.safetensors`` or a sharded
``model.safetensors.index.json``). One tensor at a time; nothing is read until asked for."""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Iterator

import torch

from trtllm_loop.checkpoint.safetensors_io import TensorInfo, no_duplicate_keys, read_header, read_tensor
from trtllm_loop.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_index(ckpt: str | Path) -> dict:
    """The parsed ``model.safetensors.index.json`` (the one parser of it): a JSON object whose ``weight_map``
    maps tensor names to shard file names *inside* the checkpoint directory (no absolute paths, no ``..``,
    no sub-directories), and whose ``metadata.total_size``, if present, is an integer >= 0 (else dropped)."""
    path = Path(ckpt) / INDEX
    try:
        idx = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start}); restore or re-download it") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({e or 'nested too deeply'}); restore or re-download it") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
        raise UserError(f"{path}: has no 'weight_map' object; re-export the checkpoint")
    for name, shard in idx["weight_map"].items():
        if not isinstance(shard, str) or not shard:
            raise UserError(f"{path}: weight_map[{name!r}] is {shard!r}; expected a shard file name such as "
                            "'model-00001-of-00002.safetensors'; re-export the checkpoint")
        p = PurePosixPath(shard)
        if p.is_absolute() or "\\" in shard or len(p.parts) != 1 or p.name in (".", ".."):
            raise UserError(f"{path}: weight_map[{name!r}] is {shard!r}, a path outside the checkpoint directory; "
                            "shards must be plain file names next to the index (trtllm-loop never follows an index "
                            "out of its checkpoint): move the shard into the checkpoint and list its file name")
    meta = idx.get("metadata")
    if not isinstance(meta, dict):
        idx["metadata"] = meta = {}
    ts = meta.get("total_size")
    if ts is not None and not (isinstance(ts, int) and not isinstance(ts, bool) and ts >= 0):
        meta.pop("total_size")
    return idx


def weight_map(ckpt: str | Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index or from the single-file header."""
    ckpt = Path(ckpt)
    if (ckpt / INDEX).is_file():
        wm = read_index(ckpt)["weight_map"]
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
    stored_in: dict[str, Path] = {}
    out = {}
    for name, shard in wm.items():
        if shard not in headers:
            headers[shard] = read_header(shard)[0]
            for n in headers[shard]:
                if n in stored_in:
                    raise UserError(f"{shard}: tensor {n!r} is also stored in {stored_in[n]}; a tensor must be "
                                    "stored once (which copy is right?): re-export the checkpoint")
                stored_in[n] = shard
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


def duplicate_tensors(ckpt: str | Path) -> dict[str, list[Path]]:
    """Tensor names stored in more than one ``*.safetensors`` file of the checkpoint directory (listed in the
    index or not), with those files."""
    seen: dict[str, list[Path]] = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        for name in read_header(f)[0]:
            seen.setdefault(name, []).append(f)
    return {n: fs for n, fs in seen.items() if len(fs) > 1}


def iter_tensors(ckpt: str | Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` shard by shard, one tensor at a time (in file order for locality)."""
    idx = tensor_index(ckpt)
    names = list(idx) if names is None else names
    for n in names:
        if n not in idx:
            raise UserError(f"{ckpt}: tensor {n!r} is not in the checkpoint")
    for n in sorted(names, key=lambda n: (str(idx[n].file), idx[n].start)):
        yield n, read_tensor(idx[n])

