"""Imported by Python at start-up when triton_hooks/ is on PYTHONPATH (launch_triton.sh): registers the
loop model with TensorRT-LLM before Triton's llmapi model builds its LLM."""
try:
    import {{register_module}}  # noqa: F401
except ImportError:  # tensorrt_llm not in this interpreter (e.g. tritonserver's own tools)
    pass
