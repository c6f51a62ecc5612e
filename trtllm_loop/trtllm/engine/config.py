"""The TRT-LLM checkpoint ``config.json`` of the engine flow and its way back to
:class:`~trtllm_loop.config.LoopConfig`.

The C++ runtime sizes the KV cache by ``pretrained_config.num_hidden_layers`` (``createModelConfig``, C++, not in
../shared/reference; upstream's ``PretrainedModel.prepare_inputs`` also builds one KV input set per
``self.config.num_hidden_layers``, ``tensorrt_llm/models/modeling_utils.py``, since ``builder.build`` passes no
``num_hidden_layers``), so the config says ``num_hidden_layers = 2 * L`` (the interleaved slot plan of
:meth:`LoopConfig.slot_plan`) and keeps the physical layer count as ``num_unique_layers``, as the PyTorch
backend's deploy view does (:mod:`trtllm_loop.trtllm.torch_backend.config_view`). The window is a runtime
option (``max_attention_window``); the config carries ``loop_window_size`` for the model and the runtime writer.
"""
from __future__ import annotations

from trtllm_loop.config import ARCHITECTURE, LoopConfig
from trtllm_loop.errors import UserError

ENGINE_DTYPES = ("float32", "bfloat16", "float16")


def checkpoint_config(cfg: LoopConfig, dtype: str, tp: int, quantization: dict | None = None) -> dict:
    """The TRT-LLM checkpoint config.json (``PretrainedConfig.to_dict`` layout) of a Loop model."""
    if dtype not in ENGINE_DTYPES:
        raise UserError(f"dtype {dtype!r}: allowed {list(ENGINE_DTYPES)}")
    return {
        "architecture": ARCHITECTURE,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_kv_slots,          # KV layers: 2l pass 1 (full), 2l+1 pass 2 (window)
        "num_unique_layers": cfg.num_hidden_layers,     # decoder blocks; each runs twice with the same weights
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_size": cfg.head_dim,
        "hidden_act": "silu",
        "norm_epsilon": cfg.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": cfg.rope_theta,
        "rotary_embedding_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "loop_num": cfg.loop_num,
        "loop_window_size": cfg.loop_window_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_parallel_embedding": False,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None, "exclude_modules": None,
                         **(quantization or {})},
    }


def loop_config_of(pretrained) -> LoopConfig:
    """An engine-flow ``PretrainedConfig`` (or its dict) -> the validated :class:`LoopConfig`."""
    d = pretrained if isinstance(pretrained, dict) else vars(pretrained)
    missing = [k for k in ("num_unique_layers", "loop_window_size") if k not in d]
    if missing:
        raise UserError(f"TRT-LLM checkpoint config.json has no {missing}: it was not written by "
                        "`trtllm-loop convert --to trtllm-ckpt`; convert the HF checkpoint again")
    if d["num_hidden_layers"] != 2 * d["num_unique_layers"]:
        raise UserError(f"TRT-LLM checkpoint config.json: num_hidden_layers {d['num_hidden_layers']} must be "
                        f"2 * num_unique_layers ({d['num_unique_layers']}): one pass-1 and one pass-2 KV layer "
                        "per decoder block")
    return LoopConfig.from_dict({
        "model_type": "iquestloopcoder", "vocab_size": d["vocab_size"], "hidden_size": d["hidden_size"],
        "intermediate_size": d["intermediate_size"], "num_hidden_layers": d["num_unique_layers"],
        "num_attention_heads": d["num_attention_heads"], "num_key_value_heads": d["num_key_value_heads"],
        "head_dim": d["head_size"], "rms_norm_eps": d["norm_epsilon"], "rope_theta": d["rotary_base"],
        "max_position_embeddings": d["max_position_embeddings"], "loop_num": d.get("loop_num", 2),
        "loop_window_size": d["loop_window_size"], "tie_word_embeddings": d.get("tie_word_embeddings", False),
        "torch_dtype": d["dtype"]}, source="TRT-LLM checkpoint config.json")
