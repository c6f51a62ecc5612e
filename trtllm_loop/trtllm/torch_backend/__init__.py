"""IQuest-Coder-V1 Loop on TensorRT-LLM's PyTorch backend.

* :mod:`.modeling_iquest_loop` -- the model, registered with ``register_auto_model`` (import it before
  ``tensorrt_llm.LLM(...)``; ``trtllm-serve --custom_module_dirs`` does this through the deploy directory);
* :mod:`.config_view` -- the deploy ``config.json`` view (2L KV layers) and its way back to ``LoopConfig``;
* :func:`run_logits` -- teacher-forced logits through the model, batched and chunked like the paged runtime
  (``trtllm-loop logits --mode torch-backend``), on real TRT-LLM or on the API double.
"""
from trtllm_loop.trtllm.torch_backend.runner import run_logits  # noqa: F401
