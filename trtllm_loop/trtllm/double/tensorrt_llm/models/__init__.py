"""Mimics ``tensorrt_llm/models/__init__.py`` ``MODEL_MAP`` (architecture -> engine-flow model class): the
double ships no models; a custom model registers itself here before ``PretrainedConfig.from_dict`` or the
builder look it up (the real map holds TRT-LLM's own ~100 architectures)."""
MODEL_MAP = {}
