"""Mimics ``tensorrt_llm/models/modeling_utils.py``: ``QuantConfig`` (fields used by the PyTorch backend) and the
engine flow's ``PretrainedConfig`` / ``PretrainedModel``."""
import fnmatch
from dataclasses import dataclass, field
from typing import List, Optional

from tensorrt_llm.module import Module
from tensorrt_llm.quantization.mode import QuantAlgo


@dataclass
class QuantConfig:
    quant_algo: Optional[QuantAlgo] = None
    kv_cache_quant_algo: Optional[QuantAlgo] = None
    group_size: int = 128
    exclude_modules: Optional[List[str]] = field(default=None)

    def is_module_excluded_from_quantization(self, name: str) -> bool:
        """fnmatch on TRT-LLM module names; fused qkv/gate_up names also match their HF parts."""
        if not self.exclude_modules:
            return False
        names = [name]
        if name.endswith("qkv_proj"):
            names += [name[:-8] + p for p in ("q_proj", "k_proj", "v_proj")]
        if name.endswith("gate_up_proj"):
            names += [name[:-12] + p for p in ("gate_proj", "up_proj")]
        return any(fnmatch.fnmatchcase(n, pat) for n in names for pat in self.exclude_modules)


class PretrainedConfig:
    """``models/modeling_utils.py`` ``PretrainedConfig`` (engine flow): the TRT-LLM checkpoint's config.json.
    Extra keys become attributes (the real one logs "Implicitly setting ..."); ``from_dict`` resolves the class
    through ``MODEL_MAP[config['architecture']].config_class``."""

    def __init__(self, *, architecture: str, dtype: str, hidden_size: int, num_hidden_layers: int,
                 num_attention_heads: int, vocab_size: Optional[int] = None, hidden_act: str = 'gelu',
                 logits_dtype: str = 'float32', norm_epsilon: float = 1e-5, position_embedding_type=None,
                 max_position_embeddings: Optional[int] = None, rotary_embedding_dim: Optional[int] = None,
                 num_key_value_heads: Optional[int] = None, intermediate_size: Optional[int] = None, mapping=None,
                 quantization=None, use_parallel_embedding: bool = False, embedding_sharding_dim: int = 0,
                 head_size: Optional[int] = None, qk_layernorm: bool = False, runtime_defaults=None, **kwargs):
        from tensorrt_llm.functional import PositionEmbeddingType
        from tensorrt_llm.mapping import Mapping

        self.architecture, self.dtype, self.vocab_size = architecture, dtype, vocab_size
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = hidden_size, num_hidden_layers, \
            num_attention_heads
        self.hidden_act, self.logits_dtype, self.norm_epsilon = hidden_act, logits_dtype, norm_epsilon
        pet = position_embedding_type or PositionEmbeddingType.learned_absolute
        if isinstance(pet, str):
            pet = PositionEmbeddingType.from_string(pet)
        assert isinstance(pet, PositionEmbeddingType)
        self.position_embedding_type = pet
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.intermediate_size = hidden_size * 4 if intermediate_size is None else intermediate_size
        self.max_position_embeddings = max_position_embeddings
        mapping = Mapping() if mapping is None else Mapping.from_dict(mapping) if isinstance(mapping, dict) else mapping
        assert isinstance(mapping, Mapping)
        self.mapping = mapping
        if quantization is None:
            quantization = QuantConfig()
        elif isinstance(quantization, dict):
            q = dict(quantization)
            for k in ("quant_algo", "kv_cache_quant_algo"):
                q[k] = QuantAlgo(q[k]) if q.get(k) is not None else None
            quantization = QuantConfig(**{k: v for k, v in q.items() if k in QuantConfig.__dataclass_fields__})
        assert isinstance(quantization, QuantConfig)
        self.quantization = quantization
        self.use_parallel_embedding, self.embedding_sharding_dim = use_parallel_embedding, embedding_sharding_dim
        self.head_size = hidden_size // num_attention_heads if head_size is None else head_size
        self.qk_layernorm = qk_layernorm
        self.rotary_embedding_dim = self.head_size if rotary_embedding_dim is None else rotary_embedding_dim
        self.runtime_defaults = runtime_defaults
        for key, value in kwargs.items():
            setattr(self, key, value)

    @property
    def quant_algo(self):
        return self.quantization.quant_algo

    @property
    def kv_dtype(self):
        return "fp8" if self.quantization.kv_cache_quant_algo == QuantAlgo.FP8 else self.dtype

    @classmethod
    def from_dict(cls, config: dict):
        from tensorrt_llm.models import MODEL_MAP

        model_cls = MODEL_MAP[config['architecture']]
        config_cls = getattr(model_cls, 'config_class', cls)
        return config_cls(**config)

    def to_dict(self):
        import copy
        import dataclasses

        output = copy.deepcopy({k: v for k, v in self.__dict__.items()})
        output['position_embedding_type'] = str(self.position_embedding_type)
        output['mapping'] = self.mapping.to_dict()
        output['mapping'].pop('rank')
        q = dataclasses.asdict(self.quantization)
        for k in ("quant_algo", "kv_cache_quant_algo"):
            q[k] = q[k].value if q[k] is not None else None
        output['quantization'] = q
        return output

    @classmethod
    def from_json_file(cls, config_file: str):
        import json

        with open(config_file) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str):
        import os

        return cls.from_json_file(os.path.join(ckpt_dir, 'config.json'))

    def set_rank(self, rank: int):
        self.mapping.rank = rank


class PostInitCaller(type):

    def __call__(cls, *args, **kwargs):
        obj = type.__call__(cls, *args, **kwargs)
        obj.__post_init__()
        return obj


def _quantize(model, quant_config) -> None:
    """``quantization/quantize.py`` ``quantize`` (not in ../shared/reference), NVFP4 only: every ``Linear`` /
    ``RowLinear`` whose module name no ``exclude_modules`` pattern matches becomes ``FP4Linear`` /
    ``FP4RowLinear`` with the same features and TP split."""
    from tensorrt_llm.layers.linear import Linear, RowLinear
    from tensorrt_llm.quantization.layers import FP4Linear, FP4RowLinear

    if quant_config.quant_algo is None:
        return
    if quant_config.quant_algo != QuantAlgo.NVFP4:
        raise NotImplementedError(f"the double runs dense and NVFP4 engines only, not "
                                  f"{quant_config.quant_algo.value} (its quantized GEMMs are CUDA kernels)")
    for parent_name, parent in list(model.named_modules()):
        for child_name, m in list(parent._modules.items()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(m) not in (Linear, RowLinear) or quant_config.is_module_excluded_from_quantization(name):
                continue
            tp = m.tp_size
            if type(m) is Linear:
                new = FP4Linear(m.in_features, m.out_features * tp, bias=m.bias is not None, dtype=m.weight.dtype,
                                tp_group=m.tp_group, tp_size=tp, gather_output=m.gather_output, is_qkv=m.is_qkv)
            else:
                new = FP4RowLinear(m.in_features * tp, m.out_features, bias=m.bias is not None, dtype=m.weight.dtype,
                                   tp_group=m.tp_group, tp_size=tp)
            setattr(parent, child_name, new)


def _preprocess_nvfp4(weights: dict) -> dict:
    """``preprocess_perlayer_weights`` (modeling_utils.py), NVFP4 branch: checkpoint names -> layer names, the
    block scales also interleaved (upstream: ``torch.ops.trtllm.block_scale_interleave``; here
    :func:`trtllm_loop.nvfp4.swizzle_block_scale`, the same 128x4 layout), ``alpha = act_sf * weight_sf``."""
    from trtllm_loop import nvfp4

    for name in list(weights):
        if name.endswith('weights_scaling_factor'):
            t = weights.pop(name)
            n, kb = t.shape
            new = name.replace('weights_scaling_factor', 'weights_block_scaling_factor')
            weights[new] = t
            weights[new + "_interleaved"] = nvfp4.swizzle_block_scale(t).reshape(-(-n // 128) * 128, -(-kb // 4) * 4)
        elif name.endswith('weights_scaling_factor_2'):
            weights[name.replace('weights_scaling_factor_2', 'weights_global_scaling_factor')] = weights.pop(name)
        elif name.endswith('activation_scaling_factor'):
            weights[name.replace('activation_scaling_factor', 'activation_global_scaling_factor')] = weights.pop(name)
    for name in list(weights):
        if name.endswith('weights_global_scaling_factor'):
            act = weights[name.replace('weights_global_scaling_factor', 'activation_global_scaling_factor')]
            weights[name.replace('weights_global_scaling_factor', 'alpha')] = act * weights[name]
    return weights


class PretrainedModel(Module, metaclass=PostInitCaller):
    """``PretrainedModel`` (engine flow), a ``Module``: after ``__init__`` the layers are swapped for the
    quantization's (``__post_init__`` -> ``quantize``); ``from_checkpoint(ckpt_dir, rank)`` reads
    ``rank{r}.safetensors``, preprocesses it (NVFP4) and loads it strictly (``load``: every parameter must be
    provided, "Required but not provided tensors"; extras only warn upstream)."""

    def __init__(self, config: "PretrainedConfig"):
        super().__init__()
        self.config = config

    def __post_init__(self):
        _quantize(self, self.config.quantization)

    @classmethod
    def from_config(cls, config: "PretrainedConfig"):
        return cls(config)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, rank: Optional[int] = None, config: Optional["PretrainedConfig"] = None,
                        *, preprocess_weights_hook=None):
        import os

        import safetensors.torch

        if config is None:
            config = PretrainedConfig.from_json_file(os.path.join(ckpt_dir, 'config.json'))
        if rank is not None:
            config.set_rank(rank)
        weights_path = os.path.join(ckpt_dir, f'rank{config.mapping.rank}.safetensors')
        assert os.path.isfile(weights_path)
        weights = safetensors.torch.load_file(weights_path)
        if preprocess_weights_hook is not None:
            weights = preprocess_weights_hook(weights)
        if config.quantization.quant_algo == QuantAlgo.NVFP4:
            weights = _preprocess_nvfp4(weights)
        model = cls(config)
        model.load(weights)
        return model

    def load(self, weights, from_pruned=False):
        required = {name for name, p in self.named_parameters() if not p.is_inited()}
        provided = set(weights)
        if not required.issubset(provided):
            raise RuntimeError(f"Required but not provided tensors:{required.difference(provided)}")
        for name, param in self.named_parameters():
            if name in provided:
                try:
                    param.value = weights[name]
                except Exception as e:
                    raise RuntimeError(f"Encounter error '{e}' for parameter '{name}'")

    def prepare_inputs(self, max_batch_size, max_input_len, max_seq_len, max_num_tokens, use_cache,
                       max_beam_width: int = 1, opt_num_tokens: int = None, prompt_embedding_table_size: int = 0,
                       position_encoding_2d: bool = False, max_draft_len: int = 0,
                       speculative_decoding_draft_tokens_external: bool = False,
                       spec_decoding_is_generation_length_variable: bool = False, gather_context_logits: bool = False,
                       lora_target_modules: List[str] = None, opt_batch_size: int = 0, num_hidden_layers: int = None,
                       mrope_rotary_cos_sin_size: int = None):
        """The network inputs, with one KV input set per KV layer (``num_hidden_layers`` if given, else the
        config's -- the C++ runtime sizes its KV cache by the config's). The double executes eagerly, so the
        inputs it returns carry the values of a probe step (one request, one context token) on a fresh KV
        cache: ``build``'s ``model(**inputs)`` then really runs the forward once, recording what it adds."""
        from tensorrt_llm._common import default_net
        from tensorrt_llm._eager_engine import kv_manager, step_inputs

        import torch

        pc = default_net().plugin_config
        if not (use_cache and pc.paged_kv_cache and pc.remove_input_padding and pc.gpt_attention_plugin):
            raise NotImplementedError("the double builds with the GPT attention plugin, a paged KV cache and packed "
                                      "inputs only (TRT-LLM's defaults)")
        if max_beam_width != 1 or max_draft_len or prompt_embedding_table_size or lora_target_modules:
            raise NotImplementedError("the double builds beam width 1 without drafts, prompt tables or LoRA")
        layers = self.config.num_hidden_layers if num_hidden_layers is None else num_hidden_layers
        default_net().kv_layers = layers
        mgr = kv_manager(self.config, pc.tokens_per_block, max_seq_len, 1, [max_seq_len], self.config.dtype)
        mgr.add_dummy_requests([0], [1])
        from trtllm_loop.runtime.attention import StepMetadata

        mgr.prepare_step(StepMetadata([0], [0], [1]))
        return step_inputs(mgr, [(0, 0, 1, torch.zeros(1, dtype=torch.int32))], [0], [max_seq_len] * layers,
                           max_input_len, gather_context_logits)
