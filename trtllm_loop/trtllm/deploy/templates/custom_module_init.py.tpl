"""trtllm-serve --custom_module_dirs package: registers IQuestLoopCoderForCausalLM with TensorRT-LLM's
PyTorch backend (``register_auto_model``) and the deploy-view config with transformers' AutoConfig."""
import {{register_module}}  # noqa: F401
