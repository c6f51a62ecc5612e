"""Mimics ``tensorrt_llm/models/modeling_utils.py`` ``QuantConfig`` (fields used by the PyTorch backend)."""
import fnmatch
from dataclasses import dataclass, field
from typing import List, Optional

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
