"""Reference model. Importing it registers ``iquestloopcoder`` with ``AutoConfig`` and
``AutoModelForCausalLM``: ``AutoModelForCausalLM.from_pretrained(ckpt)`` then needs no trust_remote_code."""
from transformers import AutoConfig, AutoModelForCausalLM

from trtllm_loop.modeling.configuration import IQuestLoopCoderConfig
from trtllm_loop.modeling.modeling_iquestloopcoder import (IQuestLoopCoderForCausalLM, IQuestLoopCoderModel,
                                                           LoopCache)

AutoConfig.register(IQuestLoopCoderConfig.model_type, IQuestLoopCoderConfig, exist_ok=True)
AutoModelForCausalLM.register(IQuestLoopCoderConfig, IQuestLoopCoderForCausalLM, exist_ok=True)

__all__ = ["IQuestLoopCoderConfig", "IQuestLoopCoderForCausalLM", "IQuestLoopCoderModel", "LoopCache"]
