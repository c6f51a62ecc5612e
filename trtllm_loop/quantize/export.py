"""ModelOpt unified-checkpoint metadata (``hf_quant_config.json`` and the ``config.json`` quantization block),
as ModelOpt 0.47's ``export_hf_checkpoint`` writes them (``shared/docs/nvfp4.md`` section 2.1; fixtures
``tests/fixtures/nvfp4/modelopt_*``), with trtllm-loop as the producer. Used by ``convert`` and ``quantize``."""
from __future__ import annotations

import json
from pathlib import Path

from trtllm_loop import __version__

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# ModelOpt lists lm_head and embed_tokens; the loop gates are no Linear, so ModelOpt never lists them, but
# they stay BF16 too and readers (vLLM's fnmatch, TRT-LLM) must not look for scales there
EXCLUDE = ["lm_head", "model.embed_tokens", "model.gate_projections*"]
ALGOS = ("NVFP4", "W4A16_NVFP4", "FP8")
GROUP_SIZE = 16


def quant_configs(algo: str, kv_fp8: bool) -> tuple[dict, dict]:
    """-> (``hf_quant_config.json`` content, ``config.json["quantization_config"]``) for ``algo`` in ALGOS."""
    producer = {"name": "trtllm-loop", "version": __version__}
    nvfp4 = algo != "FP8"
    q = {"quant_algo": algo, "kv_cache_quant_algo": "FP8" if kv_fp8 else None}
    if nvfp4:
        q["group_size"] = GROUP_SIZE
    q["exclude_modules"] = list(EXCLUDE)
    scheme = {"dynamic": False, "num_bits": 4 if nvfp4 else 8, "type": "float"}
    if nvfp4:
        scheme["group_size"] = GROUP_SIZE
    group = {"weights": dict(scheme), "targets": ["Linear"]}
    if algo != "W4A16_NVFP4":
        group = {"input_activations": dict(scheme), **group}
    qc = {"config_groups": {"group_0": group}, "ignore": list(EXCLUDE), "quant_algo": algo}
    if kv_fp8:
        qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    qc.update({"producer": producer, "quant_method": "modelopt"})
    return {"producer": producer, "quantization": q}, qc


def write_configs(src: Path, dst: Path, algo: str | None, kv_fp8: bool, dtype: str) -> None:
    """``config.json`` of ``src`` with ``torch_dtype`` = ``dtype`` and, for a quantized ``algo``, the quantization
    block; plus ``hf_quant_config.json``. ``algo=None``: a dense checkpoint (no quantization files)."""
    cfg = json.loads((Path(src) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = dtype
    cfg.pop("dtype", None)
    if algo is not None:
        hq, qc = quant_configs(algo, kv_fp8)
        (dst / "hf_quant_config.json").write_text(json.dumps(hq, indent=4) + "\n")
        cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
