"""Argument types and flags every command shares: numeric options are range-checked by the parser itself
(``error: argument --chunk: must be a positive integer, got '0'``, exit 2), so no command sees 0, -1, NaN or
Inf where it needs a size, a count or a probability."""
from __future__ import annotations

import argparse
import math


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None


def _float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s!r}")
    return v


def positive_int(s: str) -> int:
    """An integer >= 1 (sizes, counts, block and chunk lengths)."""
    v = _int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def nonneg_int(s: str) -> int:
    """An integer >= 0 (seeds, 0-means-off options)."""
    v = _int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s!r}")
    return v


def finite_float(s: str) -> float:
    """Any finite number."""
    return _float(s)


def nonneg_float(s: str) -> float:
    """A finite number >= 0 (temperatures, timeouts)."""
    v = _float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s!r}")
    return v


def positive_float(s: str) -> float:
    """A finite number > 0 (sizes in GB)."""
    v = _float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s!r}")
    return v


def fraction(s: str) -> float:
    """A number in (0, 1] (memory fractions, top-p)."""
    v = _float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {s!r}")
    return v


def port(s: str) -> int:
    """A TCP port, 1..65535."""
    v = _int(s)
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {s!r}")
    return v


def add_force(p: argparse.ArgumentParser, what: str = "the output") -> None:
    """``--force`` (alias ``--overwrite``): replace an existing output, only if trtllm-loop wrote it."""
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help=f"replace {what} if it exists and is trtllm-loop's own output (it carries a "
                        ".trtllm-loop-output marker); anything else is never deleted")
