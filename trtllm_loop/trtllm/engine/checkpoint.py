"""``convert SRC OUT --to trtllm-ckpt [--tp N]``: an HF / ModelOpt checkpoint -> a TensorRT-LLM checkpoint for the
engine flow: ``config.json`` (:func:`~trtllm_loop.trtllm.engine.config.checkpoint_config`) and one
``rank{r}.safetensors`` per tensor-parallel rank under TRT-LLM's Llama names (:mod:`.model`).

Sharding is the PyTorch backend's (:meth:`LoopConfig.per_rank`, :meth:`LoopConfig.check_tp`): q heads and gate
rows split evenly; KV heads split, or (more ranks than KV heads, dense k/v only) rank r takes KV head
``r * Hkv // tp`` (TRT-LLM's ``duplicate_kv_weight`` order); fused qkv rows ``[q_r | k_r | v_r]``; ``dense`` and
``mlp.proj`` split their input columns, ``mlp.fc``/``mlp.gate`` and ``lm_head`` (vocab padded to a multiple of
tp) their rows; embedding and norms replicated.

Quantization is kept as stored (``tensorrt_llm/quantization/layers.py``): ModelOpt NVFP4 -> ``weight`` (packed
uint8), ``weights_scaling_factor`` (FP8 block scales), ``weights_scaling_factor_2`` (global),
``activation_scaling_factor`` (``FP4Linear``'s ``tllm_to_externel_key_dict``: weight_scale, weight_scale_2,
input_scale); the fused qkv takes the **max** of the q/k/v global scales without re-quantizing
(``FP4Linear.postprocess``: "Ckpt uses qkv max is guaranteed"), so they must be equal -- refused otherwise.
ModelOpt FP8 -> ``weight``, ``weights_scaling_factor``, ``activation_scaling_factor``, the fused qkv
re-quantized to the max weight scale (``FP8Linear.postprocess``). Embedding, lm_head, norms and loop gates stay
unquantized. Streaming: one module in memory at a time, every rank's file written side by side; atomic.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from trtllm_loop import nvfp4
from trtllm_loop.checkpoint.dequant import dense_shape, dense_weight
from trtllm_loop.checkpoint.formats import DENSE, FP8, NVFP4_MODELOPT, detect_format, group_modules
from trtllm_loop.checkpoint.hf import tensor_index
from trtllm_loop.checkpoint.safetensors_io import SafetensorsWriter, read_tensor
from trtllm_loop.checkpoint.validate import check
from trtllm_loop.checkpoint.writer import atomic_dir, copy_side_files
from trtllm_loop.config import LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.fsutil import check_output
from trtllm_loop.trtllm.engine.config import checkpoint_config

HINT = "it is not empty: choose another output directory, or pass --force to replace an earlier output"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# HF module -> (TRT-LLM module, split): col = output rows split, row = input columns split
LINEARS = {"self_attn.o_proj": ("attention.dense", "row"), "mlp.gate_proj": ("mlp.fc", "col"),
           "mlp.up_proj": ("mlp.gate", "col"), "mlp.down_proj": ("mlp.proj", "row")}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
QUANT_ALGO = {NVFP4_MODELOPT: "NVFP4", FP8: "FP8"}
UNQUANTIZED = ["lm_head", "transformer.vocab_embedding", "transformer.gate_projections.*"]


def _split(t: torch.Tensor, r: int, tp: int, dim: int) -> torch.Tensor:
    n = t.shape[dim] // tp
    return t.narrow(dim, r * n, n).contiguous()


class Sharder:
    """Per-rank slices of source tensors: ``rows`` (dim 0), ``cols`` (dim 1), ``kv_rows`` (KV heads of
    ``unit`` rows each, replicated when there are more ranks than KV heads)."""

    def __init__(self, cfg: LoopConfig, tp: int):
        self.cfg, self.tp = cfg, tp

    def rows(self, t, r):
        return _split(t, r, self.tp, 0)

    def cols(self, t, r):
        return _split(t, r, self.tp, 1)

    def kv_rows(self, t, r, unit):
        hkv = self.cfg.num_key_value_heads
        if hkv >= self.tp:
            return _split(t, r, self.tp, 0)
        h = r * hkv // self.tp  # replicated KV heads (duplicate_kv_weight's order)
        return t[h * unit:(h + 1) * unit].contiguous()


def _scalar1(t: torch.Tensor) -> torch.Tensor:
    return t.float().reshape(1)


def _linear_tensors(mods, kind, dtype):
    """``{suffix: [tensor per source module] | shared tensor}`` of one TRT-LLM linear, as stored or dense."""
    if kind == NVFP4_MODELOPT:
        g = [read_tensor(m.tensors["weight_scale_2"]).float().reshape(()) for m in mods]
        if any(x != g[0] for x in g):
            raise UserError(f"{mods[0].prefix}: q/k/v weight_scale_2 differ ({[float(x) for x in g]}); TensorRT-LLM's "
                            "fused qkv takes their max without re-quantizing (FP4Linear.postprocess); run "
                            "`trtllm-loop validate SRC --fix-fused-scales OUT` and convert OUT")
        a = max(read_tensor(m.tensors["input_scale"]).float().reshape(()) for m in mods)
        return {"weight": [read_tensor(m.tensors["weight"]) for m in mods],
                "weights_scaling_factor": [read_tensor(m.tensors["weight_scale"]) for m in mods],
                "weights_scaling_factor_2": _scalar1(g[0]), "activation_scaling_factor": _scalar1(a)}
    if kind == FP8:
        s = [read_tensor(m.tensors["weight_scale"]).float().reshape(()) for m in mods]
        a, top = max(read_tensor(m.tensors["input_scale"]).float().reshape(()) for m in mods), max(s)
        w = [read_tensor(m.tensors["weight"]) if x == top else  # FP8Linear.postprocess: re-quantize to the max
             (read_tensor(m.tensors["weight"]).float() * (x / top)).clamp(-nvfp4.E4M3_MAX, nvfp4.E4M3_MAX)
             .to(torch.float8_e4m3fn) for m, x in zip(mods, s)]
        return {"weight": w, "weights_scaling_factor": _scalar1(top), "activation_scaling_factor": _scalar1(a)}
    return {"weight": [dense_weight(m, dtype) for m in mods]}


SUFFIXES = {DENSE: {"weight": (None, 1)},
            FP8: {"weight": (torch.float8_e4m3fn, 1), "weights_scaling_factor": (torch.float32, 0),
                  "activation_scaling_factor": (torch.float32, 0)},
            NVFP4_MODELOPT: {"weight": (torch.uint8, 2), "weights_scaling_factor": (torch.float8_e4m3fn, 16),
                             "weights_scaling_factor_2": (torch.float32, 0),
                             "activation_scaling_factor": (torch.float32, 0)}}


def plan(src: Path, cfg: LoopConfig, tp: int, dtype: torch.dtype):
    """``([(trt_name, [(dtype, shape) per rank], make)], kinds)`` in file order; ``make()`` -> the per-rank
    tensors of that name (read from the source when called: one module at a time)."""
    mods, other = group_modules(tensor_index(src))
    sh, rc, D = Sharder(cfg, tp), cfg.per_rank(tp), cfg.head_dim
    vp = -(-cfg.vocab_size // tp) * tp
    items, kinds = [], {}

    def module(name):
        if name not in mods:
            raise UserError(f"{src}: tensor {name}.weight is missing")
        return mods[name]

    def linear(trt, srcs, how):
        ms = [module(s) for s in srcs]
        kind = ms[0].kind
        if kind not in SUFFIXES or any(m.kind != kind for m in ms):
            raise UserError(f"{ms[0].prefix}: {kind} weights cannot go into a TRT-LLM engine-flow checkpoint as "
                            "stored; `trtllm-loop convert SRC OUT --to bf16` (or --to fp8) first, then convert OUT")
        kinds[trt] = kind
        out_f, in_f = dense_shape(ms[0])
        rows = {"qkv": (rc.num_attention_heads + 2 * rc.num_key_value_heads) * D, "col": out_f // tp}.get(how, out_f)
        cols = in_f // tp if how == "row" else in_f
        cache: dict = {}
        for n, (suffix, (dt, per)) in enumerate(SUFFIXES[kind].items()):
            spec = (dt or dtype, (rows, cols // per) if per else (1,))

            def make(suffix=suffix, last=n == len(SUFFIXES[kind]) - 1):
                if not cache:
                    cache.update(_linear_tensors(ms, kind, dtype))
                t = cache.pop(suffix)
                if last:
                    cache.clear()
                if isinstance(t, torch.Tensor):
                    return [t] * tp
                if how == "qkv":
                    q, k, v = t
                    return [torch.cat([sh.rows(q, r), sh.kv_rows(k, r, D), sh.kv_rows(v, r, D)]) for r in range(tp)]
                return [(sh.rows if how == "col" else sh.cols)(t[0], r) for r in range(tp)]
            items.append((f"{trt}.{suffix}", [spec] * tp, make))

    def plain(trt, name, split=None):
        info = other[name] if name in other else module(name.rsplit(".", 1)[0]).tensors["weight"]
        shape = tuple(info.shape)
        if split == "vocab":
            shape = (vp // tp,) + shape[1:]
        elif split == "rows":
            shape = (shape[0] // tp,) + shape[1:]

        def make():
            t = read_tensor(info).to(dtype)
            if split == "vocab":
                t = torch.cat([t, t.new_zeros(vp - t.shape[0], *t.shape[1:])])
            return [sh.rows(t, r) for r in range(tp)] if split else [t] * tp
        items.append((trt, [(dtype, shape)] * tp, make))

    plain("transformer.vocab_embedding.weight", "model.embed_tokens.weight")
    for l in range(cfg.num_hidden_layers):
        p, t = f"model.layers.{l}.", f"transformer.layers.{l}."
        plain(t + "input_layernorm.weight", p + "input_layernorm.weight")
        linear(t + "attention.qkv", [p + s for s in QKV], "qkv")
        for hf, (trt, how) in LINEARS.items():
            linear(t + trt, [p + hf], how)
        plain(t + "post_layernorm.weight", p + "post_attention_layernorm.weight")
    for l in range(cfg.num_hidden_layers):
        plain(f"transformer.gate_projections.{l}.weight", f"model.gate_projections.{l}.weight", "rows")
        plain(f"transformer.gate_projections.{l}.bias", f"model.gate_projections.{l}.bias", "rows")
    plain("transformer.ln_f.weight", "model.norm.weight")
    plain("lm_head.weight", "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight", "vocab")
    return items, kinds


def _quantization(kinds: dict, info) -> dict:
    algos = {QUANT_ALGO[k] for k in kinds.values() if k != DENSE}
    if not algos:
        return {}
    if len(algos) > 1:
        raise UserError(f"mixed NVFP4 and FP8 linears ({sorted(algos)}): TRT-LLM's MIXED_PRECISION needs a "
                        "quant_cfg.json; convert the checkpoint to one format first")
    dense = [n for n, k in kinds.items() if k == DENSE]
    return {"quant_algo": algos.pop(), "kv_cache_quant_algo": "FP8" if info.kv_cache_quant == "FP8" else None,
            "group_size": 16, "exclude_modules": UNQUANTIZED + dense}


def convert_trtllm(src: str | Path, out: str | Path, tp: int = 1, dtype: str | None = None,
                   force: bool = False) -> dict:
    """Validate ``src``, write the TRT-LLM checkpoint ``out`` atomically; returns a summary."""
    src, out = Path(src), Path(out)
    check_output(out, force, HINT, protect=(src,))
    warnings = check(src)
    cfg = LoopConfig.from_file(src)
    info = detect_format(src)
    dtype = dtype or (cfg.torch_dtype if cfg.torch_dtype in DTYPES else "bfloat16")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: allowed {sorted(DTYPES)}")
    if info.quant_algo not in (None, "NVFP4", "FP8"):
        raise UserError(f"{src}: {info.quant_algo} is not a TensorRT-LLM 1.2 engine-flow QuantAlgo we convert (NVFP4, "
                        "FP8 or dense); `trtllm-loop convert SRC OUT --to bf16` (or --to fp8) first")
    cfg.check_tp(tp, f"{src}/config.json", replicate_kv=info.quant_algo is None)
    for what, n in (("intermediate_size", cfg.intermediate_size), ("hidden_size", cfg.hidden_size)):
        if n % tp:
            raise UserError(f"--tp {tp} must divide {what} ({n}) of {src}/config.json")
    items, kinds = plan(src, cfg, tp, DTYPES[dtype])
    if info.quant_algo == "NVFP4" and any(k == NVFP4_MODELOPT for k in kinds.values()):
        for n, k in ((cfg.hidden_size, "hidden_size"), (cfg.intermediate_size, "intermediate_size")):
            if (n // tp) % 16:
                raise UserError(f"--tp {tp}: {k} / tp = {n // tp} is not a multiple of the NVFP4 block (16)")
    quant = _quantization(kinds, info)
    config = checkpoint_config(cfg, dtype, tp, quant)
    with atomic_dir(out, force, HINT, protect=(src,)) as tmp:
        writers = [SafetensorsWriter(tmp / f"rank{r}.safetensors", {n: specs[r] for n, specs, _ in items})
                   for r in range(tp)]
        try:
            for name, _, make in tqdm(items, desc="convert->trtllm-ckpt", unit="tensor", disable=None):
                for w, t in zip(writers, make()):
                    w.write(name, t)
        finally:
            for w in writers:
                w._f.close()
        for w in writers:
            w.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")
        copied = copy_side_files(src, tmp)
    return {"out": str(out), "tp": tp, "dtype": dtype, "quantization": quant or None, "source_format": info.to_dict(),
            "tensors": len(items), "copied": copied, "warnings": [str(w) for w in warnings]}
