"""Mimics ``tensorrt_llm/plugin/plugin.py`` ``PluginConfig``: the plugin options a build records (defaults as
upstream: gpt_attention_plugin "auto", gemm_plugin None, paged_kv_cache None (the builder resolves it),
remove_input_padding / context_fmha / use_paged_context_fmha True, tokens_per_block 32).
``update_from_dict`` takes "enable"/"disable" like upstream; unknown names are ignored there too."""

_DEFAULTS = {"dtype": "float16", "gpt_attention_plugin": "auto", "gemm_plugin": None, "nccl_plugin": "auto",
             "paged_kv_cache": None, "remove_input_padding": True, "context_fmha": True, "tokens_per_block": 32,
             "use_paged_context_fmha": True, "use_fp8_context_fmha": True, "fuse_fp4_quant": False,
             "streamingllm": False}


class PluginConfig:
    # the real class is a dataclass whose fields all have defaults; here they are class attributes
    locals().update(_DEFAULTS)
    _explicitly_disable_gemm_plugin = False

    def update_from_dict(self, config: dict):
        for name, value in config.items():
            if not hasattr(self, name):
                continue
            if isinstance(getattr(self, name), bool) or name == "paged_kv_cache":
                value = {"enable": True, "disable": False}.get(value, value)
            elif value == "disable":
                value = None
            setattr(self, name, value)

    @classmethod
    def from_dict(cls, config: dict):
        plugin_config = cls()
        plugin_config.update_from_dict(config)
        if config.get("gemm_plugin") == "disable":
            plugin_config._explicitly_disable_gemm_plugin = True
        return plugin_config

    def to_dict(self):
        return {k: getattr(self, k) for k in _DEFAULTS}
