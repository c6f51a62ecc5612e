"""Checkpoint format detection: what the config files claim, and what each module's tensors actually are.

Formats (``shared/docs/nvfp4.md`` sections 2-3):

* ``hf``: dense BF16/FP16/FP32 weights;
* ``modelopt``: ``hf_quant_config.json`` or ``config.json["quantization_config"]`` with ``quant_method: modelopt``;
  quant algos NVFP4, NVFP4_AWQ (``pre_quant_scale``), W4A16_NVFP4, FP8; FP8 KV scales ``k_scale``/``v_scale``;
* ``compressed-tensors``: ``quant_method: compressed-tensors``, format ``nvfp4-pack-quantized``; schemes NVFP4
  (``input_global_scale``) and NVFP4A16.

Which modules are quantized is decided from the tensors present, not from targets/ignore lists (llm-compressor's
``model_free_ptq`` quantizes ``embed_tokens`` although the config says ``targets: [Linear]``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trtllm_loop.checkpoint.safetensors_io import TensorInfo
from trtllm_loop.errors import UserError

# tensor-name suffixes that belong to a quantized module (besides ``weight``/``bias``)
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "weight_global_scale", "input_scale", "input_global_scale",
                  "pre_quant_scale", "weight_zero_point", "k_scale", "v_scale")
PACKED_SUFFIXES = ("weight_packed",)

NVFP4_MODELOPT = "nvfp4-modelopt"
NVFP4_CT = "nvfp4-ct"
FP8 = "fp8"
DENSE = "dense"

FUSED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


@dataclass
class QuantInfo:
    """What the checkpoint's config files say about quantization."""
    format: str                       # "hf" | "modelopt" | "compressed-tensors"
    quant_algo: str | None = None     # NVFP4, NVFP4_AWQ, W4A16_NVFP4, FP8, MIXED_PRECISION, NVFP4A16
    group_size: int | None = None
    kv_cache_quant: str | None = None
    exclude_modules: list[str] = field(default_factory=list)
    producer: str | None = None
    source: str | None = None         # file the quantization config came from

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Module:
    """The tensors stored for one module prefix (e.g. ``model.layers.0.self_attn.q_proj``)."""
    prefix: str
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # suffix -> info

    @property
    def kind(self) -> str:
        t = self.tensors
        if "weight_packed" in t:
            return NVFP4_CT
        w = t.get("weight")
        if w is not None and w.dtype == "U8" and "weight_scale" in t:
            return NVFP4_MODELOPT
        if w is not None and w.dtype in ("F8_E4M3", "F8_E5M2"):
            return FP8
        return DENSE

    @property
    def quantized(self) -> bool:
        return self.kind != DENSE

    @property
    def weight_name(self) -> str:
        return f"{self.prefix}.weight"


def split_name(name: str) -> tuple[str, str]:
    prefix, _, suffix = name.rpartition(".")
    return prefix, suffix


def group_modules(index: dict[str, TensorInfo]) -> tuple[dict[str, Module], dict[str, TensorInfo]]:
    """Group ``prefix.weight``/``prefix.<scale>`` tensors by module; other tensors (norms, biases) pass through.
    Returns (modules with a weight or packed weight, the remaining tensors by name)."""
    mods: dict[str, Module] = {}
    for name, info in index.items():
        prefix, suffix = split_name(name)
        if suffix in ("weight",) + PACKED_SUFFIXES + SCALE_SUFFIXES:
            mods.setdefault(prefix, Module(prefix)).tensors[suffix] = info
    other = {n: i for n, i in index.items() if split_name(n)[1] not in ("weight",) + PACKED_SUFFIXES + SCALE_SUFFIXES}
    return mods, other


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: not valid UTF-8 JSON ({e or 'nested too deeply'}); re-export or restore the "
                        "file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: a JSON {type(d).__name__}, expected an object; re-export or restore the file")
    return d


def _obj(v, where: str, default=None) -> dict:
    """``v`` if it is a JSON object (``default`` when missing), else a UserError naming ``where``."""
    if v is None and default is not None:
        return default
    if not isinstance(v, dict):
        raise UserError(f"{where} is {str(v)[:60]!r}, expected a JSON object; re-export the checkpoint")
    return v


def _list(v, where: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise UserError(f"{where} is {str(v)[:60]!r}, expected a JSON list; re-export the checkpoint")
    return v


def _opt(v, types, where: str):
    if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
        raise UserError(f"{where} is {str(v)[:60]!r} ({type(v).__name__}); re-export the checkpoint")
    return v


def detect_format(ckpt: str | Path) -> QuantInfo:
    """Read ``hf_quant_config.json`` / ``config.json["quantization_config"]``."""
    ckpt = Path(ckpt)
    hq = ckpt / "hf_quant_config.json"
    if hq.is_file():
        d = _read_json(hq)
        q = d.get("quantization")
        if not isinstance(q, dict):
            raise UserError(f"{hq}: no 'quantization' object; re-export with modelopt's export_hf_checkpoint")
        return QuantInfo("modelopt", _opt(q.get("quant_algo"), str, f"{hq}: quantization.quant_algo"),
                         _opt(q.get("group_size"), int, f"{hq}: quantization.group_size"),
                         _opt(q.get("kv_cache_quant_algo"), str, f"{hq}: quantization.kv_cache_quant_algo"),
                         [str(m) for m in _list(q.get("exclude_modules"), f"{hq}: quantization.exclude_modules")],
                         str(_obj(d.get("producer"), f"{hq}: producer", {}).get("name", "modelopt")), str(hq))
    cfg_path = ckpt / "config.json"
    qc = _read_json(cfg_path).get("quantization_config") if cfg_path.is_file() else None
    if not qc:
        return QuantInfo("hf")
    src = f"{cfg_path}:quantization_config"
    qc = _obj(qc, src)
    method = qc.get("quant_method")
    groups = _obj(qc.get("config_groups"), f"{src}.config_groups", {})
    for name, g in groups.items():
        _obj(g, f"{src}.config_groups.{name}")
        _obj(g.get("weights"), f"{src}.config_groups.{name}.weights", {})
    kv = qc.get("kv_cache_scheme")
    if kv:
        kv = _obj(kv, f"{src}.kv_cache_scheme")
    ignore = [str(m) for m in _list(qc.get("ignore"), f"{src}.ignore")]
    if method == "modelopt":
        kv_algo = None if not kv else ("FP8" if kv.get("num_bits") == 8 else str(kv))
        gs = next(((g.get("weights") or {}).get("group_size") for g in groups.values()), 16 if "NVFP4" in
                  str(qc.get("quant_algo")) else None)
        return QuantInfo("modelopt", _opt(qc.get("quant_algo"), str, f"{src}.quant_algo"),
                         _opt(gs, int, f"{src}: group_size"), kv_algo, ignore,
                         str(_obj(qc.get("producer"), f"{src}.producer", {}).get("name", "modelopt")), src)
    if method == "compressed-tensors":
        fmts = {str(f) for f in [qc.get("format")] + [g.get("format") for g in groups.values()] if f is not None}
        if fmts != {"nvfp4-pack-quantized"}:
            raise UserError(f"{src}: compressed-tensors format {sorted(fmts)} is not supported; trtllm-loop reads "
                            "'nvfp4-pack-quantized' (llm-compressor schemes NVFP4 / NVFP4A16) only")
        w4a4 = any(g.get("input_activations") for g in groups.values())
        gsz = next(((g.get("weights") or {}).get("group_size") for g in groups.values()), None)
        return QuantInfo("compressed-tensors", "NVFP4" if w4a4 else "NVFP4A16", _opt(gsz, int, f"{src}: group_size"),
                         None if not kv else f"{kv.get('type', '')}{kv.get('num_bits', '')}".upper(),
                         ignore, "llm-compressor", src)
    raise UserError(f"{src}: quant_method {method!r} is not supported; trtllm-loop reads 'modelopt' and "
                    "'compressed-tensors' (nvfp4-pack-quantized) checkpoints, or dense HF checkpoints")
