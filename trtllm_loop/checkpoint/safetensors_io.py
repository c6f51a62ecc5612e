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
# the dtypes a dense (unquantized) weight may have; F64 and integers are refused rather than silently cast
DENSE_FLOATS = ("F32", "F16", "BF16")


def nonfinite_count(t: torch.Tensor) -> int:
    """Number of NaN/Inf elements of a float tensor, in row chunks (no full-size temporary)."""
    if not t.is_floating_point() or not t.numel():
        return 0
    flat = t.reshape(-1)
    step = 1 << 24
    return sum(int((~torch.isfinite(flat[i:i + step])).sum()) for i in range(0, flat.numel(), step))


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


class _Corrupt(ValueError):
    pass


def no_duplicate_keys(pairs):
    """``json.loads(object_pairs_hook=...)``: a JSON object with a key twice is corrupt (ValueError)."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Corrupt(f"key {k!r} appears twice")
        d[k] = v
    return d


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and check a safetensors header: a JSON object of ``name -> {dtype, shape, data_offsets}`` (plus an
    optional ``__metadata__`` of strings), no name twice, every tensor inside the file (truncation is caught
    here), byte ranges that match dtype x shape and do not overlap. Anything else is a one-line UserError."""
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
            header = json.loads(f.read(n), object_pairs_hook=no_duplicate_keys)
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: cannot read the safetensors header ({e or type(e).__name__}); the file is "
                        "truncated or corrupt, copy or download it again") from None
    bad = f"{path}: corrupt safetensors header"
    fix = "the file is corrupt or was not written by a safetensors writer; copy or re-export it"
    if not isinstance(header, dict):
        raise UserError(f"{bad}: a JSON {type(header).__name__}, expected an object; {fix}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{bad}: '__metadata__' must be an object of strings; {fix}")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise UserError(f"{bad}: tensor {name!r} must be an object with 'dtype', 'shape' and "
                            f"'data_offsets', got {str(e)[:80]}; {fix}")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str):
            raise UserError(f"{bad}: tensor {name!r} has dtype {dtype!r}, expected a string such as 'BF16'; {fix}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise UserError(f"{bad}: tensor {name!r} has shape {shape!r}, expected a list of integers >= 0; {fix}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs) or \
                not 0 <= offs[0] <= offs[1]:
            raise UserError(f"{bad}: tensor {name!r} has data_offsets {offs!r}, expected [begin, end] with "
                            f"0 <= begin <= end; {fix}")
        start, end = base + offs[0], base + offs[1]
        info = TensorInfo(path, name, dtype, tuple(shape), start, end)
        if end > size:
            raise UserError(f"{path}: tensor {name!r} ends at byte {end} but the file has {size} bytes; the shard "
                            "is truncated, copy or download it again")
        dt = info.torch_dtype
        if dt is not None and (end - start) != math.prod(info.shape) * dt.itemsize:
            raise UserError(f"{path}: tensor {name!r} has {end - start} bytes, but dtype {info.dtype} and shape "
                            f"{list(info.shape)} need {math.prod(info.shape) * dt.itemsize}; re-export the "
                            "checkpoint")
        out[name] = info
    prev = None
    for info in sorted(out.values(), key=lambda i: (i.start, i.end)):
        if prev is not None and info.start < prev.end and info.nbytes and prev.nbytes:
            raise UserError(f"{bad}: tensors {prev.name!r} and {info.name!r} overlap (bytes {prev.start}-{prev.end} "
                            f"and {info.start}-{info.end}); {fix}")
        if info.nbytes:
            prev = info
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
