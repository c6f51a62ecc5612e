"""Mimics ``tensorrt_llm/_torch/attention_backend/utils.py``: ``get_attention_backend`` / ``create_attention``."""
from typing import Optional

from .interface import PositionalEmbeddingParams
from .trtllm import TrtllmAttention


def get_attention_backend(backend_name: str):
    if backend_name != "TRTLLM":
        raise NotImplementedError(f"the double implements the TRTLLM attention backend only, not {backend_name}")
    return TrtllmAttention


def create_attention(backend_name: str, layer_idx: int, num_heads: int, head_dim: int,
                     num_kv_heads: Optional[int] = None, pos_embd_params: Optional[PositionalEmbeddingParams] = None,
                     quant_config=None, q_scaling: Optional[float] = None, is_mla_enable: bool = False):
    if is_mla_enable:
        raise NotImplementedError("MLA is not part of the double")
    return get_attention_backend(backend_name)(layer_idx, num_heads, head_dim, num_kv_heads,
                                               quant_config=quant_config, q_scaling=q_scaling,
                                               pos_embd_params=pos_embd_params)
