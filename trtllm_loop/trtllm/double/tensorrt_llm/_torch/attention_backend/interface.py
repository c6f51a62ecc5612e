"""Mimics ``tensorrt_llm/_torch/attention_backend/interface.py`` (1.2.1): the metadata every attention backend
reads, RoPE parameters and the backend base class."""
import enum
from dataclasses import dataclass, field
from typing import Generic, List, Optional, TypeVar

import torch

from tensorrt_llm.functional import PositionEmbeddingType
from tensorrt_llm.mapping import Mapping
from tensorrt_llm.models.modeling_utils import QuantConfig

from ..metadata import KVCacheParams


class PredefinedAttentionMask(str, enum.Enum):
    CAUSAL = "causal"
    FULL = "full"


@dataclass
class AttentionRuntimeFeatures:
    """interface.py @b35ac1b: what the runtime enables; ``chunked_prefill`` or ``cache_reuse`` select paged
    context FMHA in ``TrtllmAttention.forward`` (trtllm.py), without which a later context chunk does not
    attend over the earlier ones."""
    chunked_prefill: bool = False
    cache_reuse: bool = False
    has_speculative_draft_tokens: bool = False
    chunk_size: int = 0
    chunked_prefill_buffer_batch_size: int = 4


@dataclass(kw_only=True)
class AttentionMetadata:
    """Packed batch: context requests first (``num_contexts``), then generation requests; ``seq_lens`` = new
    tokens per request, ``kv_cache_params.num_cached_tokens_per_seq`` = tokens already in the cache."""
    max_num_requests: int
    max_num_tokens: int
    kv_cache_manager: object
    mapping: Optional[Mapping] = None
    seq_lens: Optional[torch.Tensor] = None
    num_contexts: int = 0
    position_ids: Optional[torch.Tensor] = None
    kv_cache_params: Optional[KVCacheParams] = None
    request_ids: Optional[List[int]] = None
    prompt_lens: Optional[List[int]] = None
    is_cuda_graph: bool = False
    runtime_features: AttentionRuntimeFeatures = field(default_factory=AttentionRuntimeFeatures)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_generations(self) -> int:
        return self.num_seqs - self.num_contexts

    @property
    def num_tokens(self) -> int:
        return int(self.seq_lens.sum())

    def prepare(self):
        """Hook called before the forward step (host-side work lives here, never in forward)."""


@dataclass(kw_only=True, unsafe_hash=True)
class RopeParams:
    dim: int = 0
    theta: float = 10000.0
    max_positions: int = 1024

    @staticmethod
    def from_config(config) -> "RopeParams":
        head_dim = getattr(config, "head_dim", None)
        if not isinstance(head_dim, int):
            head_dim = config.hidden_size // config.num_attention_heads
        scaling = getattr(config, "rope_scaling", None)
        if scaling and (scaling.get("type") or scaling.get("rope_type")) not in (None, "default"):
            raise NotImplementedError("the double implements unscaled RoPE only")
        return RopeParams(dim=head_dim, theta=float(getattr(config, "rope_theta", 10000.0)),
                          max_positions=config.max_position_embeddings)


@dataclass(kw_only=True, frozen=True)
class PositionalEmbeddingParams:
    """interface.py @b35ac1b: frozen, and ``__post_init__`` asserts a RoPE type carries ``rope``."""
    type: PositionEmbeddingType
    embedder: Optional[object] = None
    rope: Optional[RopeParams] = None
    is_neox: bool = True
    mrope_section: Optional[List[int]] = None

    def __post_init__(self) -> None:
        assert self.embedder is None, f"Embedder must be None for {self.type}"
        if self.type.is_rope():
            assert self.rope is not None, f"{self.type} requires a not-none rope"


TMetadata = TypeVar("TMetadata", bound=AttentionMetadata)


class AttentionBackend(Generic[TMetadata]):
    Metadata = AttentionMetadata

    def __init__(self, layer_idx: int, num_heads: int, head_dim: int, num_kv_heads: Optional[int] = None,
                 quant_config: Optional[QuantConfig] = None, **kwargs):
        self.layer_idx, self.num_heads, self.head_dim = layer_idx, num_heads, head_dim
        self.num_kv_heads = num_kv_heads or num_heads
        self.quant_config = quant_config
