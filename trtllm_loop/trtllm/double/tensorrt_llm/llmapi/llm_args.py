"""Mimics ``tensorrt_llm/llmapi/llm_args.py`` (reference commit 0249976575050d2c624a5f285683c66de311a3b7):
``KvCacheConfig`` and ``CudaGraphConfig`` are ``StrictBaseModel`` subclasses there (pydantic,
``extra = "forbid"``): an unknown field is an error, which these keyword-only dataclasses reproduce
(``TypeError: unexpected keyword argument``). Only fields the project uses are defined; the contract test
(tests/test_trtllm_contract.py) checks each exists in the real class."""
from dataclasses import dataclass
from typing import List, Optional


@dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: Optional[int] = None
    max_attention_window: Optional[List[int]] = None
    sink_token_length: Optional[int] = None
    free_gpu_memory_fraction: Optional[float] = 0.9
    host_cache_size: Optional[int] = None
    onboard_blocks: bool = True
    event_buffer_max_size: int = 0
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    # llm_args.py: "max_gpu_total_bytes: The maximum size in bytes of GPU memory that can be allocated for the
    # KV cache" (0 = from free_gpu_memory_fraction); the double sizes its VSWA pools from it
    max_gpu_total_bytes: int = 0
    dtype: str = "auto"
    tokens_per_block: int = 32

    def __post_init__(self):
        if self.max_attention_window is not None:
            self.max_attention_window = list(self.max_attention_window)


@dataclass(kw_only=True)
class CudaGraphConfig:
    batch_sizes: Optional[List[int]] = None
    max_batch_size: int = 0
    enable_padding: bool = False

    def __post_init__(self):
        if self.max_batch_size < 0:  # validate_cuda_graph_max_batch_size
            raise ValueError("cuda_graph_config.max_batch_size must be non-negative")


# ----------------------------------------------------------------------------- speculative decoding
# llm_args.py @0249976: DecodingBaseConfig and the two linear-draft configs the Loop model can run
# (NGramDecodingConfig, DraftTargetDecodingConfig; both "supports_backend: backend == 'pytorch'"). Eagle, MTP,
# Medusa and Lookahead need hidden states or heads the Loop model does not have: the double does not define them.
@dataclass(kw_only=True)
class DecodingBaseConfig:
    max_draft_len: Optional[int] = None
    max_total_draft_tokens: Optional[int] = None
    speculative_model_dir: Optional[str] = None
    max_concurrency: Optional[int] = None

    @classmethod
    def from_dict(cls, data: dict):
        """DecodingBaseConfig.from_dict: dispatch on ``decoding_type`` ("Invalid decoding type" otherwise)."""
        data = dict(data)
        config_class = {"NGram": NGramDecodingConfig, "DraftTarget": DraftTargetDecodingConfig}.get(
            data.get("decoding_type"))
        if config_class is None:
            raise ValueError(f"Invalid decoding type: {data.get('decoding_type')}")
        data.pop("decoding_type")
        return config_class(**data)

    def supports_backend(self, backend: str) -> bool:
        return backend == "pytorch"

    def __post_init__(self):
        # NGram/DraftTarget __init__: "Current ... only support linear tree"
        self.max_total_draft_tokens = self.max_draft_len


@dataclass(kw_only=True)
class NGramDecodingConfig(DecodingBaseConfig):
    max_matching_ngram_size: int = 0
    is_keep_all: bool = True
    is_use_oldest: bool = True
    is_public_pool: bool = True
    decoding_type = "NGram"


@dataclass(kw_only=True)
class DraftTargetDecodingConfig(DecodingBaseConfig):
    decoding_type = "Draft_Target"
