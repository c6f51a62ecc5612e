"""Mimics ``tensorrt_llm/builder.py`` (engine flow): ``BuildConfig``, ``build(model, build_config) -> Engine``,
``Engine.save`` / ``Engine.from_dir``, ``EngineConfig``.

What ``build`` mirrors (builder.py): ``plugin_config.dtype = model.config.dtype``; the KV cache type resolved
to paged; context FMHA off -> paged context FMHA off; NVFP4 -> ``gemm_plugin = "nvfp4"`` unless explicitly
disabled; ``inputs = model.prepare_inputs(...)`` then ``model(**inputs)`` under the network; the engine's
``config.json`` = ``{version, pretrained_config, build_config}`` written by rank 0. The double's "engine"
``rank{r}.engine`` is a safetensors file: the network's weights (by parameter name) and, in its metadata, the
plugin layers the forward added (creator name, version, namespace, fields) and the marked outputs -- what the
double runtime checks before it runs the model again, eagerly."""
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from tensorrt_llm._common import Network, net_guard
from tensorrt_llm.plugin import PluginConfig

_ENGINE_FORMAT = "trtllm-loop-double-engine/1"


@dataclass
class BuildConfig:
    max_input_len: int = 1024
    max_seq_len: int = None
    opt_batch_size: int = 8
    max_batch_size: int = 2048
    max_beam_width: int = 1
    max_num_tokens: int = 8192
    opt_num_tokens: Optional[int] = None
    kv_cache_type: Optional[str] = None
    gather_context_logits: int = False
    gather_generation_logits: int = False
    strongly_typed: bool = True
    plugin_config: PluginConfig = field(default_factory=PluginConfig)
    dry_run: bool = False

    @classmethod
    def from_dict(cls, config, plugin_config=None):
        config = dict(config)
        pc = config.pop("plugin_config", {}) or {}
        unknown = set(config) - {f.name for f in fields(cls)}
        if unknown:
            raise AttributeError(f"BuildConfig has no field(s) {sorted(unknown)}")
        return cls(**config, plugin_config=plugin_config or PluginConfig.from_dict(pc))

    def to_dict(self):
        d = asdict(self)
        d["plugin_config"] = self.plugin_config.to_dict()
        return d


class EngineConfig:

    def __init__(self, pretrained_config, build_config: BuildConfig, version: str):
        self.pretrained_config, self.build_config, self.version = pretrained_config, build_config, version

    @classmethod
    def from_json_file(cls, config_file):
        with open(config_file) as f:
            return cls.from_json_str(f.read())

    @classmethod
    def from_json_str(cls, config_str):
        from tensorrt_llm.models.modeling_utils import PretrainedConfig

        config = json.loads(config_str)
        return cls(PretrainedConfig.from_dict(config['pretrained_config']),
                   BuildConfig.from_dict(config['build_config']), config['version'])

    def to_dict(self):
        build_config = self.build_config.to_dict()
        build_config.pop('dry_run', None)
        return {'version': self.version, 'pretrained_config': self.pretrained_config.to_dict(),
                'build_config': build_config}


class Engine:

    def __init__(self, config: EngineConfig, engine, managed_weights: dict = {}):
        self.config, self.engine = config, engine  # engine: (weights dict, network record)

    def save(self, engine_dir: str):
        from safetensors.torch import save_file

        os.makedirs(engine_dir, exist_ok=True)
        rank = self.config.pretrained_config.mapping.rank
        if rank == 0:
            with open(os.path.join(engine_dir, 'config.json'), "w", encoding="utf-8") as f:
                json.dump(self.config.to_dict(), f, indent=4)
        if self.engine is not None:
            weights, record = self.engine
            save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(engine_dir, f'rank{rank}.engine'),
                      metadata={"format": _ENGINE_FORMAT, "network": json.dumps(record)})

    @classmethod
    def from_dir(cls, engine_dir: str, rank: int = 0):
        from safetensors import safe_open

        path = os.path.join(engine_dir, f'rank{rank}.engine')
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _ENGINE_FORMAT:
                raise RuntimeError(f"{path}: not an engine of this TensorRT-LLM double")
            weights = {k: f.get_tensor(k) for k in f.keys()}
        config = EngineConfig.from_json_file(os.path.join(engine_dir, 'config.json'))
        config.pretrained_config.set_rank(rank)
        return cls(config, (weights, json.loads(meta["network"])))


def _fields(fc) -> dict:
    out = {}
    for f in fc:
        data = f.data.tolist() if hasattr(f.data, "tolist") else f.data
        out[f.name] = {"type": f.type.name, "data": data}
    return out


def build(model, build_config: BuildConfig) -> Engine:
    from tensorrt_llm import __version__
    from tensorrt_llm.quantization.mode import QuantAlgo

    pc = build_config.plugin_config
    pc.dtype = model.config.dtype
    if build_config.kv_cache_type in (None, "PAGED", "paged"):  # BuildConfig.update_kv_cache_type
        build_config.kv_cache_type = "PAGED"
        pc.paged_kv_cache = True if pc.paged_kv_cache is None else pc.paged_kv_cache
    if build_config.max_seq_len is None:
        build_config.max_seq_len = model.config.max_position_embeddings
    if not pc.context_fmha:
        pc.use_fp8_context_fmha = False
        pc.use_paged_context_fmha = False
    if model.config.quantization.quant_algo == QuantAlgo.NVFP4 and not pc._explicitly_disable_gemm_plugin:
        pc.gemm_plugin = "nvfp4"  # "NVFP4 quantization detected, by default enabling NVFP4 GEMM plugin"
    network = Network(pc)
    with net_guard(network):
        inputs = model.prepare_inputs(max_batch_size=build_config.max_batch_size,
                                      max_input_len=build_config.max_input_len,
                                      max_seq_len=build_config.max_seq_len,
                                      max_num_tokens=build_config.max_num_tokens,
                                      use_cache=build_config.kv_cache_type != "DISABLED",
                                      max_beam_width=build_config.max_beam_width,
                                      gather_context_logits=build_config.gather_context_logits)
        model(**inputs)
    if "logits" not in network.outputs:
        raise RuntimeError("the network marks no 'logits' output")
    record = {"plugin_layers": network.plugin_layers, "outputs": sorted(network.outputs)}
    for layer in record["plugin_layers"]:
        layer["fields"] = _fields(layer["fields"])
    weights = {name: p.raw_value for name, p in model.named_parameters()}
    engine = None if build_config.dry_run else (weights, record)
    return Engine(EngineConfig(model.config, build_config, __version__), engine)
