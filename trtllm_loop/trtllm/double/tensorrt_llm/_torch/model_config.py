"""Mimics ``tensorrt_llm/_torch/model_config.py`` ``ModelConfig`` (1.2.1): the wrapper every PyTorch-backend
module takes; ``get_layer_types`` is TRT-LLM's Gemma3-only VSWA hack, reproduced as is (models that want VSWA
must patch it, as the loop adapter does)."""
from dataclasses import dataclass, field
from typing import Generic, List, Optional, TypeVar

from tensorrt_llm.bindings import LayerType
from tensorrt_llm.mapping import Mapping
from tensorrt_llm.models.modeling_utils import QuantConfig

TConfig = TypeVar("TConfig")


@dataclass
class _BindingsModelConfig:
    """The few fields of the C++ ``ModelConfig`` the VSWA KV manager reads."""
    num_layers: int
    tokens_per_block: int
    layer_types: Optional[List[LayerType]]


@dataclass(kw_only=True)
class ModelConfig(Generic[TConfig]):
    pretrained_config: Optional[TConfig] = None
    mapping: Mapping = field(default_factory=Mapping)
    quant_config: QuantConfig = field(default_factory=QuantConfig)
    quant_config_dict: Optional[dict] = None
    skip_create_weights_in_init: bool = False
    max_num_tokens: int = 8192
    max_seq_len: Optional[int] = None
    attn_backend: str = "TRTLLM"
    use_cuda_graph: bool = False
    extra_attrs: dict = field(default_factory=dict)

    def get_quant_config(self, name: Optional[str] = None) -> QuantConfig:
        return self.quant_config

    def get_layer_types(self) -> Optional[List[LayerType]]:
        # TRT-LLM 1.2.1: "This method is a hack ... only tested for Gemma3ForCausalLM"
        if self.pretrained_config.architectures[0] == "Gemma3ForCausalLM":
            return [LayerType.ATTENTION] * self.pretrained_config.num_hidden_layers
        return None

    def get_num_attention_layers(self) -> int:
        return self.pretrained_config.num_hidden_layers

    def get_bindings_model_config(self, tokens_per_block: Optional[int] = None) -> _BindingsModelConfig:
        return _BindingsModelConfig(self.pretrained_config.num_hidden_layers, tokens_per_block or 64,
                                    self.get_layer_types())
