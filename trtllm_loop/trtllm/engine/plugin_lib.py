"""Which GPUs a plugin library can run on: the CUDA fat binaries embedded in the ``.so`` (``.nv_fatbin``), read
without ``cuobjdump``. A fat binary is a 16-byte header (magic ``0xBA55ED50``, version, header size, payload
size) and entries, each ``kind`` (1 = PTX, 2 = SASS cubin), header size, payload size, ..., SM at byte 28.
SASS runs only on its own SM (the ``sm_100a``/``sm_121a`` family-specific targets the gate plugin builds are not
forward compatible); PTX is JIT-compiled for the same or a newer SM."""
from __future__ import annotations

import struct
from pathlib import Path

from trtllm_loop.errors import UserError

MAGIC = struct.pack("<I", 0xBA55ED50)


def cuda_archs(lib: str | Path) -> dict[str, set[int]]:
    """``{"sass": {100, 121}, "ptx": {...}}`` of every fat binary in ``lib``."""
    data = Path(lib).read_bytes()
    out: dict[str, set[int]] = {"sass": set(), "ptx": set()}
    i = data.find(MAGIC)
    while i != -1 and i + 16 <= len(data):
        _, _, hsz, fsz = struct.unpack_from("<IHHQ", data, i)
        off, end = i + hsz, min(i + hsz + fsz, len(data))
        while off + 32 <= end:
            kind, _, ehs, size = struct.unpack_from("<HHIQ", data, off)
            if ehs < 32 or kind not in (1, 2):
                break
            out["sass" if kind == 2 else "ptx"].add(struct.unpack_from("<I", data, off + 28)[0])
            off += ehs + size
        i = data.find(MAGIC, max(end, i + 4))
    return out


def check_plugin_sm(lib: str | Path, sm: int, where: str) -> None:
    """Refuse a plugin library that has no code for SM ``sm``, naming the SMs it has and the fix."""
    with open(lib, "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise UserError(f"--gate-plugin {lib}: not a shared library (no ELF header); give the libloop_gate "
                            "plugin .so that `make plugins` builds into build/plugins/")
    archs = cuda_archs(lib)
    if sm in archs["sass"] or any(p <= sm for p in archs["ptx"]):
        return
    have = [f"sm_{a}" for a in sorted(archs["sass"])] + [f"compute_{a} (PTX)" for a in sorted(archs["ptx"])]
    raise UserError(f"{lib}: the gate plugin has code for {', '.join(have) or 'no GPU'}, not SM{sm} of {where}; "
                    f"rebuild plugins/loop_gate with LOOP_GATE_SASS including {sm}a (cmake -DLOOP_GATE_SASS=...)")
