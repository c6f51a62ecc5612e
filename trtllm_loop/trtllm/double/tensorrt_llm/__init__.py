"""API double of TensorRT-LLM 1.2.1 (see ../README.md). Not the real package."""
IS_TRTLLM_LOOP_DOUBLE = True
__version__ = "1.2.1"


def __getattr__(name):  # LLM / SamplingParams are imported lazily, as the real package's llmapi is heavy
    if name in ("LLM", "SamplingParams"):
        from tensorrt_llm import llmapi
        return getattr(llmapi, name)
    raise AttributeError(name)
