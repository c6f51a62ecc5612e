"""Minimal safetensors reader/writer that touches one tensor at a time.

Reading uses plain ``readinto`` of a tensor's byte range (no mmap), so the resident set holds at most the
tensor being processed, whatever the shard size. Writing takes the full list of (name, dtype, shape) first,
writes the header, then streams the tensors in that order.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from trtllm_loop.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: str            # safetensors dtype string, e.g. "U8", "F8_E4M3"
    shape: tuple[int, ...]
    start: int            # absolute byte offset in the file
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse a safetensors header; check every tensor lies inside the file (truncation is caught here)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the safetensors header ({e}); the file is truncated or corrupt, "
                        "copy or download it again") from None
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, e in header.items():
        start, end = (base + o for o in e["data_offsets"])
        info = TensorInfo(path, name, e["dtype"], tuple(e["shape"]), start, end)
        if end > size:
            raise UserError(f"{path}: tensor {name!r} ends at byte {end} but the file has {size} bytes; the shard "
                            "is truncated, copy or download it again")
        dt = info.torch_dtype
        if dt is not None and (end - start) != math.prod(info.shape) * dt.itemsize:
            raise UserError(f"{path}: tensor {name!r} has {end - start} bytes, but dtype {info.dtype} and shape "
                            f"{list(info.shape)} need {math.prod(info.shape) * dt.itemsize}; re-export the "
                            "checkpoint")
        out[name] = info
    return out, meta


def read_tensor(info: TensorInfo) -> torch.Tensor:
    dt = info.torch_dtype
    if dt is None:
        raise UserError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, which trtllm-loop cannot read")
    buf = bytearray(info.nbytes)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        got = f.readinto(buf)
    if got != info.nbytes:
        raise UserError(f"{info.file}: tensor {info.name!r} is cut short ({got} of {info.nbytes} bytes); the "
                        "shard is truncated, copy or download it again")
    if not buf:
        return torch.empty(info.shape, dtype=dt)
    return torch.frombuffer(buf, dtype=dt).reshape(info.shape)


class SafetensorsWriter:
    """Write ``specs`` (name -> (dtype, shape)) to ``path``: header now, tensors via :meth:`write` in order."""

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        off = 0
        for name, (dt, shape) in specs.items():
            nb = math.prod(shape) * dt.itemsize
            header[name] = {"dtype": NAMES[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._pending = list(specs.items())
        self.path = path

    def write(self, name: str, t: torch.Tensor) -> None:
        want, (dt, shape) = self._pending.pop(0) if self._pending else (None, (None, None))
        if name != want or t.dtype != dt or tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"writer: got {name} {t.dtype} {tuple(t.shape)}, expected {want} {dt} {shape}")
        t = t.contiguous()
        if t.numel():
            self._f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # buffer protocol, no copy

    def close(self) -> None:
        if self._pending:
            raise RuntimeError(f"writer: {len(self._pending)} tensors not written to {self.path}")
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._f.close()
