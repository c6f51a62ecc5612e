"""Mimics the enums of ``tensorrt_llm/functional.py`` that the PyTorch backend uses."""
import enum


class PositionEmbeddingType(enum.IntEnum):
    learned_absolute = 0
    rope_gptj = 1
    rope_gpt_neox = 2

    def is_rope(self) -> bool:  # functional.py @b35ac1b (the double's members only)
        return self in (PositionEmbeddingType.rope_gptj, PositionEmbeddingType.rope_gpt_neox)


class AllReduceParams:
    def __init__(self, strategy=None, fusion_op=None, bias=None, residual=None, norm_weight=None, scale=None,
                 norm_pre_residual_weight=None, eps: float = 1e-06, enable_allreduce: bool = True,
                 trigger_completion_at_end: bool = True):
        self.enable_allreduce = enable_allreduce
