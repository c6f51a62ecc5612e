"""Contract test: the API double against the verbatim TensorRT-LLM 1.2-era sources in ../shared/reference
(parsed with ``ast``, never imported). Every public class, function and method the double defines must exist in
the real module of the same path (following the real module's ``from ... import`` re-exports and its base
classes), with compatible parameters: the double's positional parameters a prefix of the real ones in the same
order, its keyword-only ones keyword-accepting there, required exactly where the real ones are required, and
every required real parameter present. Dataclass / pydantic fields must be fields of the real class. Each
mismatch is reported by name."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import IN_CI, REPO

REF = REPO.parent / "shared" / "reference" / "TensorRT-LLM"
DOUBLE = REPO / "trtllm_loop" / "trtllm" / "double"
# Not checked, each for the reason given: double-only helpers (trtllm/API.md "Double-only helper"), and symbols
# whose real home is not in ../shared/reference (C++ bindings, executor/result.py, _torch/metadata.py,
# _torch/distributed/); those stay "to check on the wheel" in trtllm/API.md
DOUBLE_ONLY = {
    "tensorrt_llm/_torch/distributed/__init__.py": {"SimulatedWorld", "AllReduce", "allgather"},  # not in reference
    "tensorrt_llm/_torch/metadata.py": {"KVCacheParams"},                                      # not in reference
    "tensorrt_llm/bindings/__init__.py": {"DataType", "LayerType"},                            # C++ bindings
    "tensorrt_llm/bindings/executor.py": {"KvCacheConfig"},                                    # C++ bindings
    "tensorrt_llm/bindings/internal/batch_manager.py": {"CacheType"},                          # C++ bindings
    "tensorrt_llm/_torch/pyexecutor/resource_manager.py": {"KVCacheManager.prepare_step",      # double-only
                                                           "KVCacheManager.window_of"},
    # context_chunks / check_window_shares: mirrors of C++ rules (double-only); Logprob, CompletionOutput and
    # RequestOutput's abort/aborted live in executor/result.py (GenerationResult), not in reference
    "tensorrt_llm/llmapi/llm.py": {"context_chunks", "check_window_shares", "Logprob", "CompletionOutput",
                                   "RequestOutput.abort", "RequestOutput.aborted",
                                   "END_ID_ERROR", "LLM_ARG_FIELDS", "SWA_CHUNK_UNIT"},  # double-only constants
    # real Mapping(...) constructs an MpiTopology (mapping.py), which defines tp_rank / pp_rank / tp_group
    "tensorrt_llm/mapping.py": {"Mapping.tp_rank", "Mapping.pp_rank", "Mapping.tp_group"},
    # engine flow: tensorrt_llm/_common.py + network.py, module.py, parameter.py are not in reference (their
    # symbols are the ones every engine-flow model imports); _emulator / _eager_engine are double-only helpers
    # (the attention both doubles share; the C++ runtime's step, not a Python module upstream)
    "tensorrt_llm/_common.py": {"ITensor", "Network", "default_net", "default_trtnet", "net_guard"},
    "tensorrt_llm/module.py": {"Module", "ModuleList"},
    "tensorrt_llm/parameter.py": {"Parameter"},
    "tensorrt_llm/_emulator.py": {"paged_backend", "paged_step_attend"},
    "tensorrt_llm/_eager_engine.py": {"window_sizes", "step_inputs", "kv_manager", "load_engine", "run_step"},
}


def _reference() -> Path:
    if not REF.is_dir():
        if IN_CI:
            pytest.fail(f"CI runs with shared/ beside the repository; {REF} is missing")
        pytest.skip(f"{REF} is absent (the TensorRT-LLM reference sources live in ../shared/reference)")
    return REF


class Module:
    def __init__(self, root: Path, rel: str):
        self.root, self.rel = root, rel
        self.tree = ast.parse((root / rel).read_text())
        self.defs = {n.name: n for n in self.tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        # module-level names bound by assignment (``ColumnLinear = Linear``, ``sigmoid = partial(...)``)
        self.assigned = {t.id for n in self.tree.body if isinstance(n, ast.Assign) for t in n.targets
                         if isinstance(t, ast.Name)}
        self.imports = {}
        pkg = Path(rel).parent
        for n in self.tree.body:
            if isinstance(n, ast.ImportFrom):
                if n.level:
                    base = pkg
                    for _ in range(n.level - 1):
                        base = base.parent
                    mod = base / (n.module or "").replace(".", "/") if n.module else base
                else:
                    mod = Path((n.module or "").replace(".", "/"))
                for a in n.names:
                    self.imports[a.asname or a.name] = (str(mod), a.name)


def _module(root: Path, dotted_path: str) -> Module | None:
    for cand in (f"{dotted_path}.py", f"{dotted_path}/__init__.py"):
        if (root / cand).is_file():
            return Module(root, cand)
    return None


def resolve(root: Path, rel: str, name: str, depth: int = 0):
    """The real definition of ``name`` as seen from module ``rel`` (following re-exports)."""
    mod = Module(root, rel)
    if name in mod.defs:
        return mod, mod.defs[name]
    if name in mod.imports and depth < 5:
        src, real = mod.imports[name]
        m = _module(root, src)
        if m is not None:
            return resolve(root, m.rel, real, depth + 1)
    return None, None


def find_method(root: Path, mod: Module, cls: ast.ClassDef, name: str, depth: int = 0):
    for n in cls.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name:
            return n
    for b in cls.bases:
        base = b.value if isinstance(b, ast.Subscript) else b
        if isinstance(base, ast.Name) and depth < 6:
            m, c = resolve(root, mod.rel, base.id)
            if isinstance(c, ast.ClassDef):
                found = find_method(root, m, c, name, depth + 1)
                if found is not None:
                    return found
    return None


def class_fields(root: Path, mod: Module, cls: ast.ClassDef, depth: int = 0) -> set[str]:
    out = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    for b in cls.bases:
        if isinstance(b, ast.Name) and depth < 6:
            m, c = resolve(root, mod.rel, b.id)
            if isinstance(c, ast.ClassDef):
                out |= class_fields(root, m, c, depth + 1)
    return out


def params(fn: ast.FunctionDef) -> dict:
    a = fn.args
    pos = a.posonlyargs + a.args
    req_pos = len(pos) - len(a.defaults)
    return {"pos": [p.arg for p in pos], "pos_required": {p.arg for p in pos[:req_pos]},
            "kwonly": [p.arg for p in a.kwonlyargs],
            "kw_required": {p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is None},
            "varargs": a.vararg is not None, "varkw": a.kwarg is not None}


def compare(name: str, d: ast.FunctionDef, r: ast.FunctionDef) -> list[str]:
    dp, rp = params(d), params(r)
    out = []
    if dp["pos"] != rp["pos"][:len(dp["pos"])]:
        out.append(f"{name}: positional parameters {dp['pos']} are not a prefix of the real {rp['pos']}")
    real_kw = set(rp["pos"]) | set(rp["kwonly"])
    for k in dp["kwonly"]:
        if k not in real_kw and not rp["varkw"]:
            out.append(f"{name}: keyword-only parameter {k!r} does not exist in the real signature")
        elif k in rp["pos"] and k not in rp["kwonly"]:
            pass  # accepted by keyword there too
    for k in sorted(rp["pos_required"] | rp["kw_required"]):
        if k not in set(dp["pos"]) | set(dp["kwonly"]):
            out.append(f"{name}: the real required parameter {k!r} is missing")
    for k in sorted((dp["pos_required"] | dp["kw_required"]) - (rp["pos_required"] | rp["kw_required"])):
        out.append(f"{name}: parameter {k!r} is required in the double but optional in the real code")
    for k in sorted((rp["pos_required"] | rp["kw_required"]) & (set(dp["pos"]) | set(dp["kwonly"]))
                    - (dp["pos_required"] | dp["kw_required"])):
        out.append(f"{name}: parameter {k!r} has a default in the double but is required in the real code")
    if dp["varkw"] and not rp["varkw"]:
        out.append(f"{name}: the double takes **kwargs, the real code does not (extra arguments are errors there)")
    return out


def mismatches(ref: Path) -> tuple[list[str], int]:
    found, checked = [], 0
    for path in sorted(DOUBLE.rglob("*.py")):
        rel = str(path.relative_to(DOUBLE))
        if not rel.startswith("tensorrt_llm/"):
            continue
        dmod = Module(DOUBLE, rel)
        allowed = DOUBLE_ONLY.get(rel, set())
        if not (ref / rel).is_file():
            public = [n for n in dmod.defs if not n.startswith("_") and n not in allowed]
            found += [f"{rel}: no such module in the reference (defines {public})"] if public else []
            continue
        rmod = Module(ref, rel)
        for name in sorted(dmod.assigned - set(dmod.defs)):
            if name.startswith("_") or name == "IS_TRTLLM_LOOP_DOUBLE" or name in allowed:
                continue
            checked += 1
            if name not in rmod.defs and name not in rmod.imports and name not in rmod.assigned:
                found.append(f"{rel}: {name} (assigned) does not exist in the real module")
        for name, node in dmod.defs.items():
            if name.startswith("_") or name in allowed:
                continue
            checked += 1
            rmod, rnode = resolve(ref, rel, name)
            if rnode is None:
                found.append(f"{rel}: {name} does not exist in the real module")
                continue
            if isinstance(node, ast.FunctionDef):
                found += [f"{rel}: {m}" for m in compare(name, node, rnode)] if isinstance(rnode, ast.FunctionDef) \
                    else [f"{rel}: {name} is a function in the double, not in the real code"]
                continue
            if not isinstance(rnode, ast.ClassDef):
                found.append(f"{rel}: {name} is a class in the double, not in the real code")
                continue
            fields = class_fields(ref, rmod, rnode)
            for n in node.body:
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and not n.target.id.startswith("_"):
                    checked += 1
                    if n.target.id not in fields:
                        found.append(f"{rel}: field {name}.{n.target.id} does not exist in the real class")
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    qual = f"{name}.{n.name}"
                    if qual in allowed or (n.name.startswith("_") and n.name not in ("__init__", "__call__")):
                        continue
                    checked += 1
                    real = find_method(ref, rmod, rnode, n.name)
                    if real is None:
                        found.append(f"{rel}: method {qual} does not exist in the real class")
                    elif n.name != "__init__" or not any(isinstance(x, ast.AnnAssign) for x in node.body):
                        found += [f"{rel}: {m}" for m in compare(qual, n, real)]
    return found, checked


def test_the_double_matches_the_real_tensorrt_llm_sources():
    found, checked = mismatches(_reference())
    assert checked > 50
    assert not found, f"{len(found)} mismatch(es) with ../shared/reference:\n" + "\n".join(found)


def test_the_contract_check_reports_a_mismatch_by_name(tmp_path):
    """The checker itself can fail: a real-looking tree whose TrtllmAttention.forward takes other parameters."""
    ref = _reference()
    fake = tmp_path / "TensorRT-LLM"
    import shutil
    shutil.copytree(ref / "tensorrt_llm", fake / "tensorrt_llm")
    p = fake / "tensorrt_llm/_torch/attention_backend/trtllm.py"
    text = p.read_text()
    old = "metadata: TrtllmAttentionMetadata,\n        out_scale: Optional[torch.Tensor] = None,\n"
    assert old in text
    p.write_text(text.replace(old, "metadata: TrtllmAttentionMetadata,\n"))  # out_scale dropped
    (fake / "tensorrt_llm/mapping.py").write_text("class Other: pass\n")
    found, _ = mismatches(fake)
    assert any("TrtllmAttention.forward: positional parameters" in m for m in found), found
    assert any("tensorrt_llm/mapping.py: Mapping does not exist in the real module" in m for m in found), found
