"""``IQuestLoopCoderConfig``: the transformers config class for ``model_type = "iquestloopcoder"``.

It stores the HF fields as they are; :meth:`to_loop_config` validates them once through
:class:`trtllm_loop.config.LoopConfig` (the typed view every module reads).
"""
from __future__ import annotations

from transformers import PretrainedConfig

from trtllm_loop.config import MODEL_TYPE, LoopConfig


class IQuestLoopCoderConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=76800, hidden_size=5120, intermediate_size=27648, num_hidden_layers=80,
                 num_attention_heads=40, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                 max_position_embeddings=8192, initializer_range=0.02, rms_norm_eps=1e-5, use_cache=True,
                 rope_theta=500000.0, rope_scaling=None, attention_bias=False, attention_dropout=0.0,
                 mlp_bias=False, loop_num=2, loop_window_size=64, bos_token_id=1, eos_token_id=2,
                 pad_token_id=None, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.loop_num = loop_num
        self.loop_window_size = loop_window_size
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_loop_config(self) -> LoopConfig:
        d = {k: getattr(self, k, None) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "use_cache", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout",
            "mlp_bias", "tie_word_embeddings", "loop_num", "loop_window_size", "bos_token_id", "eos_token_id",
            "pad_token_id")}
        d["model_type"] = MODEL_TYPE
        return LoopConfig.from_dict(d, source=f"{type(self).__name__}")
