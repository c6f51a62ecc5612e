"""The build-config schema: ``build_configs/<target>.yaml`` -> :class:`BuildConfig` (each key is explained in the
YAML files). The dataclass is the one field list; the YAML type table is derived from its annotations."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

import trtllm_loop
from trtllm_loop.errors import UserError

REPO_BUILD_CONFIGS = Path(trtllm_loop.__file__).resolve().parent.parent / "build_configs"
WEIGHT_FORMATS = ("nvfp4", "fp8", "bf16", "fp16", "fp32")
KV_CACHE_DTYPES = ("auto", "fp8", "nvfp4")
GEMM_BACKENDS = ("cutlass", "cublaslt", "cuda_core")


@dataclass
class BuildConfig:
    target: str
    sm: int
    gpu_memory_gib: float
    unified_memory: bool
    weight_formats: list[str]
    kv_cache_dtype: str
    tensor_parallel_size: int
    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    tokens_per_block: int
    free_gpu_memory_fraction: float
    host_cache_size: int
    enable_block_reuse: bool
    enable_chunked_prefill: bool
    cuda_graph: dict = field(default_factory=dict)
    nvfp4_gemm_allowed_backends: list[str] = field(default_factory=list)
    source: str = field(default="", metadata={"yaml": False})  # the file it was read from, not a YAML key


def _yaml_types(annotation) -> tuple[type, ...]:
    """What a YAML value of a field with this annotation may be: a float field also takes an int."""
    base = typing.get_origin(annotation) or annotation
    return (int, float) if base is float else (base,)


_HINTS = typing.get_type_hints(BuildConfig)
_KEYS: dict[str, tuple[type, ...]] = {f.name: _yaml_types(_HINTS[f.name])
                                      for f in fields(BuildConfig) if f.metadata.get("yaml", True)}
_POSITIVE = ("tensor_parallel_size", "max_batch_size", "max_seq_len", "max_num_tokens", "tokens_per_block")


def load_build_config(path: str | Path) -> BuildConfig:
    """Parse and check ``build_configs/<target>.yaml``; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        known = sorted(p.name for p in REPO_BUILD_CONFIGS.glob("*.yaml")) if REPO_BUILD_CONFIGS.is_dir() else []
        raise UserError(f"{path}: build config not found; use one of build_configs/{{{','.join(known)}}}")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a mapping of build settings, got {type(d).__name__}")
    for key, types in _KEYS.items():
        if key not in d:
            raise UserError(f"{path}: field {key!r} is missing; copy it from build_configs/b200.yaml")
        v = d[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise UserError(f"{path}: field {key!r} is {v!r}; expected {' or '.join(t.__name__ for t in types)}")
    unknown = sorted(set(d) - set(_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(_KEYS)}")
    _check_values(path, d)
    return BuildConfig(**d, source=str(path))


def _check_values(path: Path, d: dict) -> None:
    bad = [f for f in d["weight_formats"] if f not in WEIGHT_FORMATS]
    if bad or not d["weight_formats"]:
        raise UserError(f"{path}: field 'weight_formats' has {bad or 'no entries'}; allowed: {list(WEIGHT_FORMATS)}")
    if d["kv_cache_dtype"] not in KV_CACHE_DTYPES:
        raise UserError(f"{path}: field 'kv_cache_dtype' is {d['kv_cache_dtype']!r}; allowed: "
                        f"{', '.join(KV_CACHE_DTYPES)}")
    bad = [b for b in d["nvfp4_gemm_allowed_backends"] if b not in GEMM_BACKENDS]
    if bad:
        raise UserError(f"{path}: field 'nvfp4_gemm_allowed_backends' has {bad}; allowed: {list(GEMM_BACKENDS)}")
    if not 0.05 <= d["free_gpu_memory_fraction"] <= 0.95:
        raise UserError(f"{path}: field 'free_gpu_memory_fraction' is {d['free_gpu_memory_fraction']}; "
                        "allowed: 0.05 .. 0.95")
    for key in _POSITIVE:
        if d[key] <= 0:
            raise UserError(f"{path}: field {key!r} is {d[key]}; it must be a positive integer")
    sizes = d["cuda_graph"].get("batch_sizes", [])
    if not isinstance(sizes, list) or any(not isinstance(b, int) or b <= 0 for b in sizes):
        raise UserError(f"{path}: field 'cuda_graph.batch_sizes' must be a list of positive integers")
    if sizes and max(sizes) > d["max_batch_size"]:
        raise UserError(f"{path}: field 'cuda_graph.batch_sizes' goes up to {max(sizes)} > max_batch_size "
                        f"{d['max_batch_size']}; graphs above the batch limit are never replayed")
