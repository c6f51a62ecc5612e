"""trtllm-loop: reference model, paged runtime emulator, TensorRT-LLM adapters and Triton serving for the
IQuest-Coder-V1 Loop models.

Importing the package registers ``iquestloopcoder`` with transformers' ``AutoConfig`` and
``AutoModelForCausalLM``, so a checkpoint directory loads without ``trust_remote_code``.
"""
from trtllm_loop.config import ConfigError, LoopConfig  # noqa: F401
from trtllm_loop import modeling as _modeling  # noqa: F401  (registration side effect)

__version__ = "0.1.0"
