"""TensorRT-LLM adapters. ``torch_backend`` is the PyTorch-backend model (TRT-LLM >= 1.0); ``deploy`` writes
the deploy directory ``trtllm-serve`` and Triton's ``llmapi`` model read; ``compat`` finds ``tensorrt_llm``
(the real one, else the API double under ``double/``)."""
