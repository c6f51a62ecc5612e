"""Double-only: the engine-flow runtime, eagerly. What TensorRT-LLM's C++ runtime (``Executor`` /
``ModelRunnerCpp``, not in ../shared/reference) does around an engine each step -- allocate the step's KV
blocks, fill the network inputs (packed ids and positions, request types, context lengths, past lengths,
``host_max_attention_window_sizes`` = the runtime's ``max_attention_window`` repeated over the engine's
``num_hidden_layers`` KV layers), run it -- with the model's forward executed on torch tensors."""
import torch

from tensorrt_llm.functional import Tensor, _wrap
from tensorrt_llm.layers.attention import AttentionParams, KeyValueCacheParams


def window_sizes(max_attention_window, num_layers: int, max_seq_len: int) -> list:
    """The per-KV-layer windows the runtime feeds the engine: the vector repeated over the layers, clamped."""
    vec = list(max_attention_window or [max_seq_len])
    return [min(vec[i % len(vec)], max_seq_len) for i in range(num_layers)]


def step_inputs(mgr, step, request_types, windows, max_input_len: int, gather_context_logits: bool) -> dict:
    """``forward(**inputs)`` of one step: ``step`` lists ``(request_id, past, n)``; ``request_types`` 0/1."""
    ids = torch.cat([s[3] for s in step]).to(torch.int32)
    pos = torch.cat([torch.arange(p, p + n, dtype=torch.int32) for _, p, n, _ in step])
    new = torch.tensor([n for _, _, n, _ in step], dtype=torch.int32)
    past = torch.tensor([p for _, p, _, _ in step], dtype=torch.int32)
    t = _wrap
    kv = KeyValueCacheParams(past_key_value=[None], host_past_key_value_lengths=t(past),
                             host_max_attention_window_sizes=t(torch.tensor(windows, dtype=torch.int32)),
                             host_sink_token_length=t(torch.zeros(1, dtype=torch.int32)),
                             kv_cache_block_offsets=t(torch.tensor([r for r, *_ in step], dtype=torch.int32)),
                             host_kv_cache_block_offsets=t(torch.tensor([r for r, *_ in step], dtype=torch.int32)),
                             host_kv_cache_pool_pointers=Tensor(trt_tensor=_Handle(mgr), is_network_input=False),
                             host_kv_cache_pool_mapping=t(torch.zeros(len(windows), 2, dtype=torch.int32)),
                             cache_indirection=t(torch.zeros(len(step), 1, 1, dtype=torch.int32)))
    attn = AttentionParams(sequence_length=t(past + new), context_lengths=t(new), host_context_lengths=t(new),
                           max_context_length=max_input_len,
                           host_request_types=t(torch.tensor(request_types, dtype=torch.int32)),
                           host_runtime_perf_knobs=t(torch.zeros(16, dtype=torch.int64)),
                           host_context_progress=t(torch.zeros(1, dtype=torch.int64)))
    last = None if gather_context_logits else t(torch.cumsum(new, 0).to(torch.int32))
    return {"input_ids": t(ids), "position_ids": t(pos), "use_cache": True, "last_token_ids": last,
            "kv_cache_params": kv, "attention_params": attn}


class _Handle:
    """An ``ITensor`` whose value is the KV cache manager (the double's pool pointers)."""

    def __init__(self, mgr):
        self.value, self.name = mgr, "host_kv_cache_pool_pointers"


def kv_manager(config, tokens_per_block: int, max_seq_len: int, max_batch_size: int, max_attention_window,
               dtype: str):
    """The KV cache manager of an engine (the PyTorch-backend double's: the C++ manager both flows share)."""
    from tensorrt_llm._torch.pyexecutor.resource_manager import KVCacheManager
    from tensorrt_llm.bindings import DataType
    from tensorrt_llm.bindings.internal.batch_manager import CacheType
    from tensorrt_llm.llmapi import KvCacheConfig

    kv_dtype = {"float32": DataType.FLOAT, "bfloat16": DataType.BF16, "float16": DataType.HALF}[dtype]
    kcc = KvCacheConfig(max_tokens=max_batch_size * max_seq_len, enable_block_reuse=False,
                        max_attention_window=list(max_attention_window), tokens_per_block=tokens_per_block)

    class _LayerTypes:  # VSWA needs layer types; every KV layer of an engine is attention
        layer_types = ["attention"] * config.num_hidden_layers

    return KVCacheManager(kcc, CacheType.SELF, num_layers=config.num_hidden_layers,
                          num_kv_heads=config.num_key_value_heads, head_dim=config.head_size,
                          tokens_per_block=tokens_per_block, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                          mapping=config.mapping, dtype=kv_dtype, model_config=_LayerTypes())


def load_engine(engine_dir: str, rank: int = 0):
    """``(model, engine_config)`` of ``rank{rank}.engine``: the model class from ``MODEL_MAP``, its weights
    from the engine; refused, like a real engine deserialization, when a plugin the network used has no
    creator in the registry (the plugin library was not loaded)."""
    import tensorrt as trt
    from tensorrt_llm.builder import Engine
    from tensorrt_llm.models import MODEL_MAP

    engine = Engine.from_dir(engine_dir, rank)
    weights, record = engine.engine
    for layer in record["plugin_layers"]:
        if trt.get_plugin_registry().get_creator(layer["plugin"], layer["version"], layer["namespace"]) is None:
            raise RuntimeError(f"{engine_dir}/rank{rank}.engine: getPluginCreator could not find plugin "
                               f"{layer['plugin']} version {layer['version']} (load the plugin library first)")
    config = engine.config.pretrained_config
    model = MODEL_MAP[config.architecture](config)
    model.load(weights)
    return model, engine.config


def run_step(model, plugin_config, inputs: dict):
    """One eager forward under a network with the engine's plugin config; returns the logits tensor."""
    from tensorrt_llm._common import Network, net_guard

    with net_guard(Network(plugin_config)) as net:
        model(**inputs)
    return net.outputs["logits"].trt_tensor.value
