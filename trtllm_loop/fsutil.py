"""No partial output: every command that writes a directory builds it in a temp dir next to the target and
renames it into place only when everything succeeded."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from trtllm_loop.errors import UserError


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False,
               hint: str = "choose a new directory or pass --overwrite") -> Iterator[Path]:
    """``with atomic_dir(OUT) as tmp:`` write into ``tmp``; on success it becomes OUT, on error it vanishes.
    An existing OUT is refused (with ``hint``) unless ``overwrite`` or it is an empty directory."""
    out = Path(out)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"{out}: already exists; {hint}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
