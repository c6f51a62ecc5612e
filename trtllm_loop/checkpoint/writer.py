"""Atomic, streaming checkpoint writer: shards planned from (name, dtype, shape) up front, tensors streamed in
that order into a temp dir next to OUT, renamed to OUT only when everything succeeded."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from trtllm_loop.checkpoint.hf import INDEX, SINGLE
from trtllm_loop.checkpoint.safetensors_io import SafetensorsWriter
from trtllm_loop.fsutil import MARKER, atomic_dir  # noqa: F401  (re-exported for convert / fix_fused)

Spec = tuple[torch.dtype, tuple[int, ...]]
# files that describe the weights we rewrite; everything else (tokenizer, generation config, chat template,
# README) is copied
WEIGHT_FILES = {INDEX, "hf_quant_config.json", "config.json", "recipe.yaml"}


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and other non-weight files; returns their names."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.name not in WEIGHT_FILES and f.name != MARKER:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def plan_shards(specs: dict[str, Spec], max_shard_bytes: int) -> list[dict[str, Spec]]:
    shards: list[dict[str, Spec]] = [{}]
    size = 0
    for name, (dt, shape) in specs.items():
        nb = math.prod(shape) * dt.itemsize
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (dt, shape)
        size += nb
    return shards


def write_tensors(out_dir: Path, specs: dict[str, Spec], tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int = 5 << 30, desc: str = "write") -> list[str]:
    """Write ``tensors`` (yielded in ``specs`` order) as ``model.safetensors`` or shards plus an index."""
    shards = plan_shards(specs, max_shard_bytes)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    total = sum(math.prod(s) * d.itemsize for d, s in specs.values())
    it = iter(tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
        for fname, shard in zip(names, shards):
            with SafetensorsWriter(out_dir / fname, shard) as w:
                for _ in range(len(shard)):
                    name, t = next(it)
                    w.write(name, t)
                    bar.update(t.numel() * t.element_size())
                    del t
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: fname for fname, shard in zip(names, shards) for n in shard}}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names
