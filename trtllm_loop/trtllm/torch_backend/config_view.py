"""The config view TRT-LLM's PyTorch backend reads (deploy ``config.json``) and its way back to
:class:`~trtllm_loop.config.LoopConfig`.

TRT-LLM 1.2.1 takes the number of KV-cache layers from ``pretrained_config.num_hidden_layers`` only
(``tensorrt_llm/_torch/pyexecutor/_util.py``, ``KvCacheCreator._create_kv_cache_manager``), so the deploy
view says ``num_hidden_layers = 2 * L`` (the interleaved slot plan of ``LoopConfig.slot_plan()``) and keeps the
physical layer count as ``num_unique_layers``. A separate ``model_type`` keeps this view from being parsed as
an 80-layer HF checkpoint by anything else (``hf_config.json`` next to it is the untouched HF view).
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from trtllm_loop.config import ARCHITECTURE, MODEL_TYPE, LoopConfig

VIEW_MODEL_TYPE = "iquestloopcoder_trtllm"


class IQuestLoopTrtllmConfig(PretrainedConfig):
    """transformers config for the deploy view; TRT-LLM's ``ModelConfig.from_pretrained`` loads it through
    ``AutoConfig`` (``tensorrt_llm/_torch/model_config.py``, ``load_pretrained_config``)."""

    model_type = VIEW_MODEL_TYPE


AutoConfig.register(VIEW_MODEL_TYPE, IQuestLoopTrtllmConfig, exist_ok=True)


def to_view_dict(cfg: LoopConfig, extra: dict | None = None) -> dict:
    """HF config -> deploy view: 2L KV layers, L physical layers. The per-slot windows are not part of it: the
    model reads them from the slot plan, TRT-LLM's KV cache from ``kv_cache_config.max_attention_window``."""
    d = cfg.to_dict()
    d.update({
        "architectures": [ARCHITECTURE],
        "model_type": VIEW_MODEL_TYPE,
        "num_hidden_layers": cfg.num_kv_slots,
        "num_unique_layers": cfg.num_hidden_layers,
        "hf_model_type": MODEL_TYPE,
    })
    d.update(extra or {})
    return d


def loop_config_from_view(pretrained_config) -> LoopConfig:
    """Deploy view (a ``PretrainedConfig`` or a dict) -> the validated HF-side :class:`LoopConfig`."""
    d = dict(pretrained_config if isinstance(pretrained_config, dict) else pretrained_config.to_dict())
    if "num_unique_layers" not in d:
        raise ValueError("config has no 'num_unique_layers': it is not a trtllm-loop deploy view; "
                         "run `trtllm-loop build CKPT --backend pytorch` and serve the deploy directory")
    if d["num_hidden_layers"] != 2 * d["num_unique_layers"]:
        raise ValueError(f"config: num_hidden_layers {d['num_hidden_layers']} must be 2 * num_unique_layers "
                         f"({d['num_unique_layers']}): one pass-1 and one pass-2 KV layer per decoder layer")
    d["num_hidden_layers"] = d.pop("num_unique_layers")
    d["model_type"] = d.pop("hf_model_type", MODEL_TYPE)
    for k in ("transformers_version", "quantization_config", "_name_or_path"):
        d.pop(k, None)
    dtype = d.pop("dtype", None)  # transformers >= 5 spells torch_dtype "dtype"
    dtype = d.get("torch_dtype") or dtype
    d["torch_dtype"] = None if dtype is None else str(dtype).replace("torch.", "")
    return LoopConfig.from_dict(d, source="deploy config.json")
