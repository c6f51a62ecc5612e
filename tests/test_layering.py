"""No module imports a module of a higher layer (function-local imports included):

    commands, cli  >  trtllm, serving, conformance  >  runtime, quantize, kernels  >  modeling  >  checkpoint, synth
    >  config, nvfp4, errors, fsutil

``trtllm_loop/__init__.py`` is exempt: it is the package facade whose import registers the model with
transformers."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "trtllm_loop"
LAYERS = [
    {"config", "nvfp4", "errors", "fsutil", ""},       # "" = the package itself (__version__)
    {"checkpoint", "synth"},
    {"modeling"},
    {"runtime", "quantize", "kernels"},
    {"trtllm", "serving", "conformance"},
    {"commands", "cli"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str | None:
    """trtllm_loop.X.Y -> X ("" for the package itself); None outside the package."""
    parts = module.split(".")
    if parts[0] != "trtllm_loop":
        return None
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "trtllm_loop":  # from trtllm_loop import nvfp4 -> the submodule
                for a in node.names:
                    yield node.lineno, f"trtllm_loop.{a.name}" if (PKG / a.name).exists() or \
                        (PKG / f"{a.name}.py").exists() else "trtllm_loop"
            else:
                yield node.lineno, node.module


def _modules():
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        if rel == Path("__init__.py"):
            continue
        yield p, rel.parts[0].removesuffix(".py")


def test_every_package_module_has_a_layer():
    assert {top for _, top in _modules()} <= set(RANK)


def test_no_import_runs_back_up_the_layers():
    bad = []
    for path, top in _modules():
        for line, module in _imports(path):
            target = _top(module)
            if target is not None and RANK[target] > RANK[top]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({top}, layer {RANK[top]}) imports {module} "
                           f"(layer {RANK[target]})")
    assert not bad, "imports that run back up the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize("src, top, ok", [("from trtllm_loop.commands.logits import compute", "trtllm", False),
                                          ("def f():\n    from trtllm_loop.quantize import x", "modeling", False),
                                          ("from trtllm_loop import nvfp4", "checkpoint", True),
                                          ("from trtllm_loop.config import LoopConfig", "commands", True)])
def test_the_check_sees_local_and_package_imports(tmp_path, src, top, ok):
    p = tmp_path / "m.py"
    p.write_text(src)
    ranks = [RANK[_top(m)] for _, m in _imports(p) if _top(m) is not None]
    assert ranks and all(r <= RANK[top] for r in ranks) == ok
