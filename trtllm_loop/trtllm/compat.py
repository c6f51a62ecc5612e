"""Find ``tensorrt_llm``: the real package when it imports, else the API double shipped in
``trtllm_loop/trtllm/double`` (CPU machines and CI, where TRT-LLM cannot be installed)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

DOUBLE_ROOT = Path(__file__).resolve().parent / "double"


def ensure_tensorrt_llm(prefer_double: bool = False):
    """Import ``tensorrt_llm`` and return ``(module, is_double)``.

    The double's directory goes on ``sys.path`` only when the real package is missing (or when
    ``prefer_double``, for tests that must not touch a real install). A real package that is installed but fails
    to import raises its own error: a GPU box must never fall back to the CPU double silently."""
    mod = sys.modules.get("tensorrt_llm")
    if mod is None and not prefer_double:
        try:
            mod = importlib.import_module("tensorrt_llm")
        except ImportError:
            if importlib.util.find_spec("tensorrt_llm") is not None:
                raise
            mod = None
    if mod is None:
        if str(DOUBLE_ROOT) not in sys.path:
            sys.path.insert(0, str(DOUBLE_ROOT))
        mod = importlib.import_module("tensorrt_llm")
    return mod, bool(getattr(mod, "IS_TRTLLM_LOOP_DOUBLE", False))
