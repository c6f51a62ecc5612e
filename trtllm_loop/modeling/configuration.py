"""``IQuestLoopCoderConfig``: the transformers config class for ``model_type = "iquestloopcoder"``.

It has no field list of its own: every field, default and derived value comes from the schema
:class:`trtllm_loop.config.LoopConfig`, and every instance is validated by ``LoopConfig.from_dict`` -- so
``AutoConfig``/``AutoModelForCausalLM.from_pretrained`` and ``trtllm_loop.modeling.load.load_model`` read a
config.json identically (a missing ``head_dim`` is hidden / heads on both paths).
"""
from __future__ import annotations

from transformers import PretrainedConfig

from trtllm_loop.config import MODEL_TYPE, LoopConfig

# handled by PretrainedConfig itself (token ids, tying, dtype)
_BASE_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "torch_dtype")


class IQuestLoopCoderConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs):
        names = LoopConfig.schema()
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in names and k != "torch_dtype"}
        loop = LoopConfig.from_dict({"model_type": MODEL_TYPE, **given}, source=type(self).__name__)
        values = loop.to_dict()
        for name in names:
            if name not in _BASE_FIELDS:
                setattr(self, name, values[name])
        super().__init__(**{k: values[k] for k in _BASE_FIELDS if k != "torch_dtype"}, **kwargs)

    @classmethod
    def from_loop_config(cls, cfg: LoopConfig) -> "IQuestLoopCoderConfig":
        values = cfg.to_dict()
        return cls(**{k: values[k] for k in LoopConfig.schema() if k != "torch_dtype"})

    def to_loop_config(self) -> LoopConfig:
        d = {k: getattr(self, k, None) for k in LoopConfig.schema() if k != "torch_dtype"}
        return LoopConfig.from_dict({"model_type": MODEL_TYPE, **d}, source=type(self).__name__)
