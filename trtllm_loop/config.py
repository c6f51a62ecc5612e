"""Parse and validate an IQuestLoopCoder ``config.json``; own the KV-cache slot plan.

Everything downstream (reference model, paged emulator, TRT-LLM adapters, sizing) reads a typed
:class:`LoopConfig` built once here, and asks this module which KV slot and which window a pass uses:

* pass 1 of layer ``l`` -> KV slot ``2l``, full causal window;
* pass 2 (local branch) of layer ``l`` -> KV slot ``2l+1``, window ``loop_window_size``
  (``W`` keys *including* the current token);
* pass 2 global branch of layer ``l`` -> reads slot ``2l`` (re-appending the identical pass-1 K/V).

Field names, defaults and released values: ``shared/docs/loop-architecture.md`` section 1.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from trtllm_loop.errors import UserError

MODEL_TYPE = "iquestloopcoder"
ARCHITECTURE = "IQuestLoopCoderForCausalLM"
RELEASED_EOS = (2, 75864, 75869)

# bytes per element of the KV-cache dtypes we size for
KV_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1, "nvfp4": 0.5 + 1 / 16}


class ConfigError(UserError, ValueError):
    """A config.json value we cannot serve; the message names the field and the allowed values."""


@dataclass(frozen=True)
class SlotSpec:
    """One KV-cache layer ("slot") of the 2*L interleaved plan."""

    slot: int           # KV layer index as TRT-LLM sees it
    layer: int          # physical decoder layer whose weights produce the K/V
    loop_pass: int      # 1 = pass 1 (the full cache), 2 = pass 2 local (the window cache)
    window: int | None  # None = full causal; else number of keys incl. the current token


_NONE = type(None)
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "loop_window_size")
_DTYPES = ("float32", "bfloat16", "float16")
# upper bounds, far above any real Loop model (the released 40B: 80 layers, hidden 5120, vocab 76800), so that a
# corrupt or absurd config.json fails here, at once, instead of after minutes of building tensor tables
MAX_SIZES = {"num_hidden_layers": 1024, "hidden_size": 1 << 17, "intermediate_size": 1 << 20,
             "vocab_size": 1 << 22, "num_attention_heads": 1024, "max_position_embeddings": 1 << 24,
             "loop_window_size": 1 << 24, "head_dim": 4096}
_FLOATS = ("rms_norm_eps", "rope_theta", "initializer_range", "attention_dropout")


def _field(default, *json_types: type, doc: str = ""):
    """A config.json field: its default (the released model's value) and the JSON types it may have."""
    return field(default=default, metadata={"json": json_types, "doc": doc})


@dataclass(frozen=True)
class LoopConfig:
    """The config.json schema: every field, its default and its JSON types, in one place.

    ``IQuestLoopCoderConfig`` (transformers) is derived from it; :meth:`from_dict` is the one validator.
    Two fields are derived when config.json leaves them out or null: ``head_dim`` = hidden / heads and
    ``num_key_value_heads`` = heads (MHA)."""

    vocab_size: int = _field(76800, int)
    hidden_size: int = _field(5120, int)
    intermediate_size: int = _field(27648, int)
    num_hidden_layers: int = _field(80, int, doc="physical layers; each runs twice")
    num_attention_heads: int = _field(40, int)
    num_key_value_heads: int = _field(8, int, _NONE, doc="null: num_attention_heads")
    head_dim: int = _field(None, int, _NONE, doc="missing or null: hidden_size // num_attention_heads")
    hidden_act: str = _field("silu", str)
    max_position_embeddings: int = _field(8192, int)
    initializer_range: float = _field(0.02, float, int)
    rms_norm_eps: float = _field(1e-5, float, int)
    use_cache: bool = _field(True, bool)
    rope_theta: float = _field(500000.0, float, int)
    rope_scaling: dict | None = _field(None, dict, _NONE)
    attention_bias: bool = _field(False, bool)
    attention_dropout: float = _field(0.0, float, int)
    mlp_bias: bool = _field(False, bool)
    tie_word_embeddings: bool = _field(False, bool)
    loop_num: int = _field(2, int)
    loop_window_size: int = _field(64, int, doc="keys of the pass-2 local window, the current one included")
    bos_token_id: int | None = _field(1, int, _NONE)
    eos_token_id: tuple[int, ...] = _field(2, int, list, tuple, _NONE, doc="one id or a list; stored as a tuple")
    pad_token_id: int | None = _field(None, int, _NONE)
    torch_dtype: str | None = _field(None, str, _NONE, doc='transformers >= 5 writes it as "dtype"')
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # keys we carry but do not use

    def __post_init__(self):
        # derived fields, so that a directly built LoopConfig(...) means what config.json means
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        eos = self.eos_token_id
        if not isinstance(eos, tuple):
            object.__setattr__(self, "eos_token_id", () if eos is None else (eos,) if isinstance(eos, int)
                               else tuple(eos))

    @classmethod
    def schema(cls) -> dict[str, tuple[tuple[type, ...], Any]]:
        """config.json field -> (allowed JSON types, default)."""
        return {f.name: (f.metadata["json"], f.default) for f in fields(cls) if "json" in f.metadata}

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "LoopConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt is None and "architecture" in d and "mapping" in d:  # what `convert --to trtllm-ckpt` writes
            raise ConfigError(f"{source}: a TensorRT-LLM checkpoint (field 'architecture' {d['architecture']!r}, "
                              "'mapping'), not a Hugging Face one; give the HF checkpoint it was converted from "
                              "(`build --backend tensorrt` and `logits --mode engine` take this one)")
        if mt != MODEL_TYPE:
            raise ConfigError(f"{source}: field 'model_type' is {mt!r}; allowed: {MODEL_TYPE!r} "
                              "(IQuest-Coder-V1 Loop checkpoints only)")
        archs = d.get("architectures")
        if archs is not None and (not isinstance(archs, list) or any(a != ARCHITECTURE for a in archs)):
            raise ConfigError(f"{source}: field 'architectures' is {archs!r}; allowed: [{ARCHITECTURE!r}]")
        schema = cls.schema()
        vals: dict[str, Any] = {}
        for name, (types, default) in schema.items():
            v = d.get(name, default)
            if name == "torch_dtype" and v is None:
                v = d.get("dtype")  # transformers >= 5 writes "dtype"
            ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
            if not ok:
                allowed = " or ".join("null" if t is _NONE else t.__name__ for t in types)
                raise ConfigError(f"{source}: field {name!r} is {v!r} ({type(v).__name__}); expected {allowed}")
            vals[name] = v
        for name in _POSITIVE:
            if vals[name] <= 0:
                raise ConfigError(f"{source}: field {name!r} is {vals[name]}; it must be a positive integer")
        for name, hi in MAX_SIZES.items():
            if vals[name] is not None and vals[name] > hi:
                raise ConfigError(f"{source}: field {name!r} is {vals[name]}, above the supported maximum {hi} "
                                  "(the released Loop models are far below it); the config.json is corrupt or not "
                                  "a Loop model's")
        for name in _FLOATS:
            if not math.isfinite(vals[name]):
                raise ConfigError(f"{source}: field {name!r} is {vals[name]!r}; it must be a finite number")
        if vals["loop_num"] != 2:
            raise ConfigError(
                f"{source}: field 'loop_num' is {vals['loop_num']}; only loop_num = 2 is supported "
                "(the released Loop models; loop_num > 2 behaves differently in every public implementation "
                "and no checkpoint uses it)")
        if vals["hidden_act"] != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' is {vals['hidden_act']!r}; allowed: 'silu'")
        rs = vals["rope_scaling"]
        factor = 1.0 if rs is None else rs.get("factor", 1.0)
        if rs is not None and (rs.get("rope_type", rs.get("type")) not in ("default", None) or
                               not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor != 1.0):
            raise ConfigError(f"{source}: field 'rope_scaling' is {rs!r}; allowed: null or "
                              "{'rope_type': 'default'} (the Loop models use plain RoPE, no scaling)")
        vals["rope_scaling"] = None  # plain RoPE however spelt (transformers >= 5 writes its rope_parameters here)
        for name in ("attention_bias", "mlp_bias"):
            if vals[name]:
                raise ConfigError(f"{source}: field {name!r} is true; allowed: false (the Loop architecture "
                                  "has bias-free projections)")
        h = vals["num_attention_heads"]
        hkv = h if vals["num_key_value_heads"] is None else vals["num_key_value_heads"]
        if hkv <= 0 or h % hkv:
            raise ConfigError(f"{source}: field 'num_key_value_heads' is {hkv}; it must divide "
                              f"num_attention_heads = {h} (allowed: {[x for x in range(1, h + 1) if h % x == 0]})")
        if vals["head_dim"] is None and vals["hidden_size"] % h:
            raise ConfigError(f"{source}: field 'head_dim' is missing and hidden_size {vals['hidden_size']} "
                              f"is not divisible by num_attention_heads {h}; set 'head_dim' explicitly")
        head_dim = vals["hidden_size"] // h if vals["head_dim"] is None else vals["head_dim"]
        if head_dim <= 0 or head_dim % 2:
            raise ConfigError(f"{source}: field 'head_dim' is {head_dim}; it must be a positive even "
                              "integer (rotate-half RoPE pairs dims i and i + head_dim/2)")
        if vals["rms_norm_eps"] <= 0 or vals["rope_theta"] <= 0:
            raise ConfigError(f"{source}: fields 'rms_norm_eps' and 'rope_theta' must be > 0")
        eos = vals["eos_token_id"]
        for e in () if eos is None else (eos,) if isinstance(eos, int) else eos:
            if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < vals["vocab_size"]:
                raise ConfigError(f"{source}: field 'eos_token_id' has {e!r}; each id must be an integer in "
                                  f"[0, vocab_size={vals['vocab_size']})")
        for name in ("bos_token_id", "pad_token_id"):
            v = vals[name]
            if v is not None and not 0 <= v < vals["vocab_size"]:
                raise ConfigError(f"{source}: field {name!r} is {v}; allowed: null or an id in "
                                  f"[0, vocab_size={vals['vocab_size']})")
        dt = vals["torch_dtype"]
        if dt is not None and dt not in _DTYPES:
            raise ConfigError(f"{source}: field 'torch_dtype' is {dt!r}; allowed: {list(_DTYPES)}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range", "attention_dropout"):
            vals[name] = float(vals[name])
        extra = {k: v for k, v in d.items() if k not in schema and k not in ("model_type", "dtype")}
        return cls(**vals, extra=extra)

    @classmethod
    def from_file(cls, path: str | Path) -> "LoopConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; a checkpoint directory must contain config.json")
        try:
            d = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start}: {e.reason}); config.json must be UTF-8 "
                              "JSON, restore or re-download it") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        """The HF ``config.json`` view (80 layers, loop fields), suitable for writing back."""
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d["eos_token_id"] = list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]
        out = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
        out.update({k: v for k, v in self.extra.items() if k != "architectures"})
        out.update(d)
        return out

    # ------------------------------------------------------------------ derived sizes
    @property
    def group_size(self) -> int:
        """Query heads per KV head; query head h reads KV head h // group_size."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def num_kv_slots(self) -> int:
        return self.num_hidden_layers * self.loop_num

    # ------------------------------------------------------------------ tensor parallelism
    def tp_sizes(self, replicate_kv: bool = True) -> list[int]:
        """TP sizes TRT-LLM can shard this model over (the one TP rule): query heads (and gate rows) split
        evenly; KV heads split evenly, or, with ``replicate_kv``, are replicated when there are more ranks than
        KV heads (tp a multiple of them). TRT-LLM's loader replicates dense k/v weights only
        (``duplicate_kv_weight`` copies weight and bias, not quantization scales; trtllm/API.md), so pass
        ``replicate_kv=False`` for quantized (NVFP4, FP8) k/v weights."""
        h, hkv = self.num_attention_heads, self.num_key_value_heads
        return [t for t in range(1, h + 1) if h % t == 0 and (hkv % t == 0 or (replicate_kv and t % hkv == 0))]

    def check_tp(self, tp: int, where: str = "config.json", replicate_kv: bool = True) -> None:
        """Raise ConfigError naming ``where`` and the allowed sizes unless ``tp`` is in :meth:`tp_sizes`."""
        ok = self.tp_sizes(replicate_kv)
        if tp in ok:
            return
        h, hkv = self.num_attention_heads, self.num_key_value_heads
        if replicate_kv:
            raise ConfigError(f"tensor parallel size {tp} does not fit {where}: it must divide num_attention_heads "
                              f"({h}) and divide or be a multiple of num_key_value_heads ({hkv}); allowed: {ok}")
        raise ConfigError(f"tensor parallel size {tp} must divide num_attention_heads ({h}) and num_key_value_heads "
                          f"({hkv}) of {where}: its k/v weights are quantized, so no more ranks than KV heads (that "
                          f"replicates the {hkv} KV heads, which TRT-LLM's loader does for dense k/v weights only); "
                          f"allowed: {ok}")

    def per_rank(self, tp: int) -> "LoopConfig":
        """The head layout one of ``tp`` tensor-parallel ranks computes: query heads split evenly, KV heads
        split evenly or (more ranks than KV heads) one replicated KV head per rank, as TRT-LLM's attention
        module does (``-(-Hkv // tp)``, ``tensorrt_llm/_torch/modules/attention.py``)."""
        if tp == 1:
            return self
        return replace(self, num_attention_heads=self.num_attention_heads // tp,
                       num_key_value_heads=-(-self.num_key_value_heads // tp))

    # ------------------------------------------------------------------ slot plan
    @staticmethod
    def pass1_slot(layer: int) -> int:
        return 2 * layer

    @staticmethod
    def pass2_slot(layer: int) -> int:
        return 2 * layer + 1

    @cached_property
    def _plan(self) -> tuple[SlotSpec, ...]:
        plan = []
        for layer in range(self.num_hidden_layers):
            plan.append(SlotSpec(self.pass1_slot(layer), layer, 1, None))
            plan.append(SlotSpec(self.pass2_slot(layer), layer, 2, self.loop_window_size))
        return tuple(plan)

    def slot_plan(self) -> list[SlotSpec]:
        """The 2L interleaved KV slots: (2l: pass 1, full), (2l+1: pass 2 local, window W)."""
        return list(self._plan)

    def slot_window(self, slot: int) -> int | None:
        """The attention window of KV slot ``slot``: None (full causal) or W keys including the current one.
        Every attention backend reads it here; nobody passes a window along with a call."""
        return self._plan[slot].window

    def slot_windows(self, max_seq_len: int) -> list[int]:
        """Per-slot windows as TRT-LLM's ``max_attention_window`` wants them: numbers only, so "full" becomes
        ``max_seq_len`` (and a window longer than that is clamped, as TRT-LLM does). Only the TRT-LLM and
        Triton writers use this spelling; inside the project "full" is None."""
        return [max_seq_len if s.window is None else min(s.window, max_seq_len) for s in self._plan]

    def window_pattern(self, max_seq_len: int) -> list[int]:
        """The repeating 2-element pattern ``[max_seq_len, W]`` TRT-LLM expands over the 2L slots."""
        return self.slot_windows(max_seq_len)[:2]

    def pool_blocks_per_sequence(self, window: int | None, tokens_per_block: int, max_seq_len: int,
                                 step_tokens: int = 1) -> int:
        """KV blocks one sequence holds in the pool of ``window`` (None = full) during a step that brings up to
        ``step_tokens`` tokens: the whole sequence for the full group; for a window group the W - 1 keys before
        the step plus the step's own tokens, rounded up to blocks, plus one block for misalignment (never more
        than the whole sequence). The one rule the paged runtime and the deploy memory plan both size with."""
        if tokens_per_block <= 0 or max_seq_len <= 0 or step_tokens <= 0:
            raise ConfigError(f"tokens_per_block ({tokens_per_block}), max_seq_len ({max_seq_len}) and step_tokens "
                              f"({step_tokens}) must be positive")
        full = math.ceil(max_seq_len / tokens_per_block)
        if window is None:
            return full
        return min(full, math.ceil((window - 1 + step_tokens) / tokens_per_block) + 1)

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> dict[str, float]:
        """K+V bytes per token: ``pass1`` (full cache, grows with T) and ``pass2`` (window cache, only
        the last W tokens of a sequence are ever held), summed over all layers."""
        if dtype not in KV_DTYPE_BYTES:
            raise ConfigError(f"KV dtype {dtype!r} unknown; allowed: {sorted(KV_DTYPE_BYTES)}")
        per_layer = 2 * self.kv_size * KV_DTYPE_BYTES[dtype]
        return {"pass1": per_layer * self.num_hidden_layers, "pass2": per_layer * self.num_hidden_layers}

    def kv_bytes_per_sequence(self, seq_len: int, dtype: str = "bfloat16") -> float:
        b = self.kv_bytes_per_token(dtype)
        return b["pass1"] * seq_len + b["pass2"] * min(seq_len, self.loop_window_size)

    # ------------------------------------------------------------------ checkpoint contract
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the released HF layout with its shape (``[out, in]`` for Linear weights)."""
        hd, H, D, kv, F = self.hidden_size, self.num_attention_heads, self.head_dim, self.kv_size, \
            self.intermediate_size
        shapes = {"model.embed_tokens.weight": (self.vocab_size, hd), "model.norm.weight": (hd,)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "self_attn.q_proj.weight": (H * D, hd),
                p + "self_attn.k_proj.weight": (kv, hd),
                p + "self_attn.v_proj.weight": (kv, hd),
                p + "self_attn.o_proj.weight": (hd, H * D),
                p + "mlp.gate_proj.weight": (F, hd),
                p + "mlp.up_proj.weight": (F, hd),
                p + "mlp.down_proj.weight": (hd, F),
                p + "input_layernorm.weight": (hd,),
                p + "post_attention_layernorm.weight": (hd,),
                f"model.gate_projections.{i}.weight": (H, D),
                f"model.gate_projections.{i}.bias": (H,),
            })
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, hd)
        return shapes

    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())
