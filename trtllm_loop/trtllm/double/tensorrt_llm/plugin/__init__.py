"""Mimics ``tensorrt_llm/plugin`` (``PluginConfig``)."""
from tensorrt_llm.plugin.plugin import PluginConfig  # noqa: F401
