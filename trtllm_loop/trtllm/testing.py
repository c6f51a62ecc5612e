"""Test support for the TensorRT-LLM adapters: tiny checkpoints in the released HF layout, and their ModelOpt
NVFP4 / FP8 exports (the tensor layout of ``shared/docs/nvfp4.md`` section 2), made with the project's own
NVFP4 quantizer (:mod:`trtllm_loop.nvfp4`). Used by the tests, by ``trtllm-loop verify`` and by the TP checks
(synthetic configs whose head counts divide 2 and 4)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from trtllm_loop.checkpoint import load_state_dict
from trtllm_loop.config import ARCHITECTURE, MODEL_TYPE, LoopConfig

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, head_dim=16, loop_window_size=4, rope_theta=10000.0, max_position_embeddings=4096)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def _write_dir(out: Path, files: dict[str, object], tensors: dict[str, torch.Tensor]) -> Path:
    """Write into a temporary sibling and rename: a checkpoint directory is complete or absent."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def make_checkpoint(out: str | Path, seed: int = 0, dtype: str = "float32", gate_bias: float | None = None,
                    **overrides) -> Path:
    """Random tiny checkpoint. Weights are scaled like the golden cases (attention far from uniform) so that
    window, RoPE, gate and TP-split bugs move the logits well above 1e-4."""
    cfg_d = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, **TINY, **overrides, "torch_dtype": dtype}
    cfg = LoopConfig.from_dict(cfg_d)
    g = torch.Generator().manual_seed(seed)
    hd, H, D, F = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size

    def rnd(shape, std):
        return torch.randn(*shape, generator=g) * std

    t = {}
    for name, shape in cfg.tensor_shapes().items():
        if name.endswith(("layernorm.weight", "norm.weight")):
            t[name] = 1 + rnd(shape, 0.1)
        elif "gate_projections" in name:
            t[name] = (torch.full(shape, float(gate_bias)) if gate_bias is not None else rnd(shape, 0.5)) \
                if name.endswith("bias") else rnd(shape, (1.0 / D) ** 0.5)
        elif "q_proj" in name or "k_proj" in name:
            t[name] = rnd(shape, 1.2 / hd ** 0.5)
        elif "o_proj" in name:
            t[name] = rnd(shape, 0.7 / (H * D) ** 0.5)
        elif "down_proj" in name:
            t[name] = rnd(shape, 0.7 / F ** 0.5)
        elif name == "lm_head.weight":
            t[name] = rnd(shape, 2.0 / hd ** 0.5)
        elif name == "model.embed_tokens.weight":
            t[name] = rnd(shape, 2.0 / hd ** 0.5 if cfg.tie_word_embeddings else 1.0)
        else:  # v_proj, mlp gate/up
            t[name] = rnd(shape, 1.0 / shape[-1] ** 0.5)
    tdt = getattr(torch, dtype)
    return _write_dir(Path(out), {"config.json": cfg.to_dict()}, {k: v.to(tdt) for k, v in t.items()})


def _quant_config_files(src: Path, algo: str) -> tuple[dict, dict]:
    cfg = json.loads((src / "config.json").read_text())
    excl = ["lm_head", "model.embed_tokens", "model.gate_projections*"]
    hq = {"producer": {"name": "modelopt", "version": "0.37.0"},
          "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": excl,
                           **({"group_size": 16} if algo == "NVFP4" else {})}}
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": algo, "ignore": excl}
    cfg["torch_dtype"] = "bfloat16" if cfg.get("torch_dtype") is None else cfg["torch_dtype"]
    return cfg, hq


def quantize_nvfp4(src: str | Path, out: str | Path, input_amax: float = 8.0) -> Path:
    """ModelOpt NVFP4 (W4A4) export of a dense checkpoint: every decoder Linear packed E2M1 + FP8 block scales;
    q/k/v and gate/up share ``weight_scale_2`` and ``input_scale`` (what TRT-LLM's fused loaders assert);
    embedding, lm_head, norms and loop gates stay dense."""
    from trtllm_loop import nvfp4

    src = Path(src)
    sd = load_state_dict(src, torch.float32)
    cfg = LoopConfig.from_file(src)
    out_t = {k: v for k, v in sd.items()}
    in_scale = torch.tensor(input_amax / nvfp4.GLOBAL_DIV, dtype=torch.float32)
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        groups = [tuple(p + n for n in grp) for grp in FUSED] + [(p + "self_attn.o_proj",), (p + "mlp.down_proj",)]
        for grp in groups:
            amax = max(float(sd[m + ".weight"].abs().max()) for m in grp)
            gscale = nvfp4.global_scale_from_amax(amax)
            for m in grp:
                packed, scale, g = nvfp4.quantize(sd[m + ".weight"], gscale)
                out_t[m + ".weight"] = packed
                out_t[m + ".weight_scale"] = scale
                out_t[m + ".weight_scale_2"] = g.reshape(()).clone()
                out_t[m + ".input_scale"] = in_scale.clone()
    cfg_d, hq = _quant_config_files(src, "NVFP4")
    return _write_dir(Path(out), {"config.json": cfg_d, "hf_quant_config.json": hq}, out_t)


def quantize_fp8(src: str | Path, out: str | Path, input_amax: float = 8.0) -> Path:
    """ModelOpt FP8 export: per-tensor ``weight_scale`` (amax/448) and a static ``input_scale``."""
    src = Path(src)
    sd = load_state_dict(src, torch.float32)
    cfg = LoopConfig.from_file(src)
    out_t = {k: v for k, v in sd.items()}
    for l in range(cfg.num_hidden_layers):
        for n in LINEARS:
            m = f"model.layers.{l}.{n}"
            w = sd[m + ".weight"]
            s = (w.abs().max() / 448.0).float()
            out_t[m + ".weight"] = (w / s).to(torch.float8_e4m3fn)
            out_t[m + ".weight_scale"] = s.reshape(())
            out_t[m + ".input_scale"] = torch.tensor(input_amax / 448.0)
    cfg_d, hq = _quant_config_files(src, "FP8")
    return _write_dir(Path(out), {"config.json": cfg_d, "hf_quant_config.json": hq}, out_t)
