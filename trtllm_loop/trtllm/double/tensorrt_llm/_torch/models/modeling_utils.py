"""Mimics ``tensorrt_llm/_torch/models/modeling_utils.py`` (1.2.1): model registry, ``DecoderModel`` and
``DecoderModelForCausalLM`` (LM head, last-token / context logits, ``__post_init__`` applying
``exclude_modules`` then ``create_weights``, and the generic ``load_weights`` walk of ``_load_weights_impl``
that fuses ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj``)."""
from typing import Dict, Generic, List, Optional, TypeVar

import torch
from torch import nn

from tensorrt_llm.models.modeling_utils import QuantConfig

from ..model_config import ModelConfig, TConfig
from ..modules.embedding import LMHead
from ..modules.linear import Linear, TensorParallelMode

MODEL_CLASS_MAPPING: Dict[str, type] = {}


def register_auto_model(name: str):
    def decorator(cls):
        MODEL_CLASS_MAPPING[name] = cls
        return cls
    return decorator


def get_model_architecture(model_config):
    cls = MODEL_CLASS_MAPPING.get(model_config.architectures[0])
    if cls is None:
        raise RuntimeError(f"Unknown model architecture: {model_config.architectures[0]}")
    return cls, model_config.architectures[0]


def filter_weights(prefix: str, weights: Dict) -> Dict:
    return {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}


def duplicate_kv_weight(weight: torch.Tensor, num_kv_heads: int, tensor_parallel_size: int) -> torch.Tensor:
    """``modeling_utils.duplicate_kv_weight``: with more TP ranks than KV heads, each KV head's rows are repeated
    ``tp / num_kv_heads`` times so that the column split hands rank r the KV head of its query heads."""
    if num_kv_heads >= tensor_parallel_size:
        assert num_kv_heads % tensor_parallel_size == 0
        return weight
    assert tensor_parallel_size % num_kv_heads == 0
    reps = tensor_parallel_size // num_kv_heads
    return weight.reshape(num_kv_heads, -1, *weight.shape[1:]).repeat_interleave(reps, dim=0) \
        .reshape(-1, *weight.shape[1:])


class DecoderModel(nn.Module):

    def __init__(self, model_config: ModelConfig):
        super().__init__()
        self.dtype = model_config.pretrained_config.torch_dtype
        self.model_config = model_config


class _PostInitCaller(type):
    def __call__(cls, *args, **kwargs):
        obj = type.__call__(cls, *args, **kwargs)
        obj.__post_init__()
        return obj


TModel = TypeVar("TModel", bound=DecoderModel)


class DecoderModelForCausalLM(nn.Module, Generic[TModel, TConfig], metaclass=_PostInitCaller):

    def __init__(self, model: TModel, *, config: ModelConfig, hidden_size: int, vocab_size: int):
        super().__init__()
        self.model_config, self.model = config, model
        self.lm_head = LMHead(vocab_size, hidden_size, dtype=config.pretrained_config.torch_dtype,
                              mapping=config.mapping, tensor_parallel_mode=TensorParallelMode.COLUMN,
                              gather_output=True)
        if config.pretrained_config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def config(self):
        return self.model_config.pretrained_config

    def __post_init__(self):
        qc = self.model_config.quant_config
        if qc is not None and qc.exclude_modules:
            for name, module in self.named_modules():
                if isinstance(module, Linear) and qc.is_module_excluded_from_quantization(name):
                    module.quant_config = QuantConfig(kv_cache_quant_algo=qc.kv_cache_quant_algo)
        for module in self.modules():
            if callable(getattr(module, "create_weights", None)):
                module.create_weights()

    def forward(self, attn_metadata, input_ids: torch.Tensor = None, position_ids: Optional[torch.Tensor] = None,
                inputs_embeds=None, return_context_logits: bool = False, spec_metadata=None, lora_params=None,
                **kwargs) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attn_metadata=attn_metadata, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, lora_params=lora_params)
        if not return_context_logits:  # LogitsProcessor: the last token of every sequence
            hidden = hidden[torch.cumsum(attn_metadata.seq_lens, 0) - 1]
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Dict, weight_mapper=None, skip_modules: List[str] = []):
        """``_load_weights_impl``: every module with parameters takes its checkpoint slice."""
        if weight_mapper is not None:
            # modeling_utils.py @89fd9b7: a mapper selects _load_weights_impl_v2, which the double does not emulate
            # (checkpoints/hf/weight_mapper.py here); ModelLoader passes one whenever load_weights names it
            raise NotImplementedError("the double implements the mapper-less loading path (_load_weights_impl) "
                                      "only; a model whose load_weights takes weight_mapper gets the v2 path "
                                      "(_load_weights_impl_v2) from TRT-LLM's ModelLoader")
        tp = self.model_config.mapping.tp_size
        num_kv = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
        params_map = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
        for name, module in self.named_modules():
            if not module._parameters or any(s in name for s in skip_modules):
                continue
            if self.config.tie_word_embeddings and name.startswith("lm_head"):
                continue
            parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            if leaf in params_map:
                parts = []
                for new in params_map[leaf]:
                    fw = filter_weights(f"{parent}.{new}", weights)
                    if new in ("k_proj", "v_proj"):
                        fw = {k: duplicate_kv_weight(v, num_kv, tp) if k in ("weight", "bias") else v
                              for k, v in fw.items()}
                    parts.append(fw)
                module.load_weights(weights=parts)
            elif hasattr(module, "load_weights"):
                module.load_weights(weights=[filter_weights(name, weights)])
            else:
                mw = filter_weights(name, weights)
                for n, p in module._parameters.items():
                    if p is not None:
                        if n not in mw:
                            raise KeyError(f"checkpoint has no tensor {name}.{n}")
                        p.data.copy_(mw[n].to(p.dtype))
