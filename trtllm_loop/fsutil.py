"""No partial output, and nothing deleted that trtllm-loop did not create.

Every command that writes builds its output in a temp dir next to the target and renames it into place only
when everything succeeded (:func:`atomic_dir` for directories, :func:`atomic_file` for single files).

* **Ownership marker.** Every output directory carries ``.trtllm-loop-output`` (JSON: tool, version, pid,
  time). An existing output is refused unless ``force`` (``--force``), and ``force`` replaces only a directory
  holding that marker (or an empty one): never a directory with other content, never a symbolic link, never
  ``/``, the home directory, the current directory or one of its parents, nor a ``protect``-ed path (the input
  checkpoint), a parent of it or (for a directory output) a path inside it.
* **Interrupted runs.** The temp dir is ``.<name>.trtllm-loop-tmp-<pid>-<random>`` and its marker is held
  under an exclusive ``flock`` while the command runs (the kernel drops the lock when the process dies, even
  on ``kill -9``). Each run removes, in the directory it writes into, the temp dirs of this tool that are not
  locked and older than the running process, and says so on stderr.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from trtllm_loop.errors import UserError

MARKER = ".trtllm-loop-output"
TMP_TAG = ".trtllm-loop-tmp-"
_PROCESS_START = time.time()


def _is_own_tmp(p: Path) -> bool:
    return p.name.startswith(".") and TMP_TAG in p.name and p.is_dir() and not p.is_symlink()


def _locked(marker: Path) -> bool:
    """True when a live process holds ``marker``'s lock."""
    try:
        fd = os.open(marker, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops our probe lock
    return False


def clean_stale(parent: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove this tool's temp dirs in ``parent`` left by interrupted runs: not locked by a live process and
    last modified before this process started. Returns what was removed (and logs each)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        try:
            if not _is_own_tmp(p) or p.stat().st_mtime >= _PROCESS_START or _locked(p / MARKER):
                continue
            m = p / MARKER
            if m.exists() and m.stat().st_mtime >= _PROCESS_START:
                continue
        except OSError:
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
            log(f"trtllm-loop: removed {p}, a temporary directory left by an interrupted run")
    return removed


def _protected(out: Path, protect: tuple, nested: bool = True) -> str | None:
    """Why ``out`` must never be replaced, or None; ``nested``: a directory output may not lie inside a
    ``protect``-ed path either (a single output file, such as a .npy, may)."""
    try:
        r = out.resolve()
    except OSError:
        return None
    cwd = Path.cwd().resolve()
    if r == Path(r.anchor):
        return "it is the filesystem root"
    if r == Path.home().resolve():
        return "it is your home directory"
    if r == cwd or r in cwd.parents:
        return "it is the current directory" if r == cwd else "it contains the current directory"
    for p in protect:
        if p is None:
            continue
        pr = Path(p).resolve()
        if r == pr:
            return "it is the input checkpoint"
        if r in pr.parents:
            return f"it contains the input {pr}"
        if nested and pr in r.parents:  # a checkpoint nested in its source: `--force` on the source would delete it
            return f"it is inside the input {pr}"
    return None


def _check_replaceable(out: Path, force: bool, hint: str, protect: tuple, own_file=None,
                       nested: bool = True) -> None:
    """Raise UserError unless writing ``out`` may replace what is there (see the module docstring)."""
    if out.is_symlink():
        raise UserError(f"{out}: is a symbolic link (to {os.readlink(out)}); trtllm-loop never replaces a link: "
                        "give the directory it points to, or another path")
    why = _protected(out, protect, nested=nested and own_file is None)
    if why:
        raise UserError(f"{out}: refusing to write here, {why}; choose a new output path")
    if not out.exists():
        return
    if out.is_dir():
        if not any(out.iterdir()):
            return
        if not force:
            raise UserError(f"{out}: already exists; {hint}")
        if not (out / MARKER).is_file():
            raise UserError(f"{out}: already exists and was not written by trtllm-loop (no {MARKER} marker); "
                            "--force replaces only trtllm-loop's own outputs: remove it yourself or choose "
                            "another path")
        return
    if not force:
        raise UserError(f"{out}: already exists; {hint}")
    if own_file is None or not out.is_file() or not own_file(out):
        raise UserError(f"{out}: already exists and is not a trtllm-loop output; --force replaces only "
                        "trtllm-loop's own outputs: remove it yourself or choose another path")


def check_output(out: str | Path, force: bool = False, hint: str = "choose a new path or pass --force",
                 protect: tuple = (), own_file: Callable[[Path], bool] | None = None, nested: bool = True) -> None:
    """Fail fast (before hours of work) if :func:`atomic_dir` / :func:`atomic_file` would refuse ``out``."""
    _check_replaceable(Path(out), force, hint, protect, own_file, nested)


@contextmanager
def _temp_dir(out: Path) -> Iterator[Path]:
    """A locked, marked temp dir next to ``out``; removed on error (the caller renames it on success)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}{os.getpid()}-", dir=out.parent))
    fd = None
    try:
        fd = os.open(tmp / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        from trtllm_loop import __version__

        os.write(fd, (json.dumps({"tool": "trtllm-loop", "version": __version__, "pid": os.getpid(),
                                  "created": time.time()}) + "\n").encode())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)  # the lock goes with it, after the rename


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False,
               hint: str = "choose a new directory or pass --force", protect: tuple = (),
               nested: bool = True) -> Iterator[Path]:
    """``with atomic_dir(OUT) as tmp:`` write into ``tmp``; on success it becomes OUT (with the ownership
    marker), on error it vanishes. An existing non-empty OUT is refused (with ``hint``) unless ``overwrite``,
    and even then replaced only when it is trtllm-loop's own output; ``protect``: paths (the input checkpoint)
    that OUT must not be, nor contain, nor (``nested``) lie inside."""
    out = Path(out)
    _check_replaceable(out, overwrite, hint, protect, nested=nested)
    with _temp_dir(out) as tmp:
        yield tmp
        _check_replaceable(out, overwrite, hint, protect, nested=nested)  # nothing appeared meanwhile
        old = None
        if out.exists():
            old = out.parent / f"{tmp.name}.old"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(out: str | Path, overwrite: bool = False, hint: str = "choose a new path or pass --force",
                own_file: Callable[[Path], bool] | None = None, protect: tuple = ()) -> Iterator[Path]:
    """``with atomic_file(OUT) as tmp_path:`` write the file ``tmp_path``; on success it becomes OUT. An existing
    OUT is replaced only with ``overwrite`` and when ``own_file(OUT)`` recognises it as trtllm-loop's."""
    out = Path(out)
    _check_replaceable(out, overwrite, hint, protect, own_file)
    with _temp_dir(out) as tmp:
        path = tmp / out.name
        yield path
        if not path.is_file():
            raise RuntimeError(f"atomic_file: nothing was written to {path}")
        _check_replaceable(out, overwrite, hint, protect, own_file)
        os.replace(path, out)
        shutil.rmtree(tmp, ignore_errors=True)
