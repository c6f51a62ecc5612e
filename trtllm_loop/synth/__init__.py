"""Synthetic IQuestLoopCoder checkpoints in the released HF layout (random weights, realistic statistics).

Weights follow the scaled-Gaussian recipe of the golden cases (so attention is not uniform and window/gate/RoPE
bugs move logits well above tolerance); norm weights are 1 + N(0, 0.1^2); every gate bias is exactly +2.0 with
small gate weights, as measured on the released model (gates ~ sigmoid(2) = 0.88).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from trtllm_loop.config import RELEASED_EOS, LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.fsutil import atomic_dir
from trtllm_loop.synth.tokenizer import write_tokenizer

PRESETS: dict[str, dict] = {
    # CPU-fast, still GQA (group 2), window crossed after 16 tokens
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, loop_window_size=16,
                 max_position_embeddings=4096),
    # GQA group 4, the released window of 64, written as two shards with an index
    "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, loop_window_size=64,
                  max_position_embeddings=8192),
    # the released 40B-Loop shape: config.json + index only (for sizing), never 80 GB of random numbers
    "40b-shape": dict(vocab_size=76800, hidden_size=5120, intermediate_size=27648, num_hidden_layers=80,
                      num_attention_heads=40, num_key_value_heads=8, head_dim=128, loop_window_size=64,
                      max_position_embeddings=131072, eos_token_id=list(RELEASED_EOS)),
}
SHARDS = {"tiny": 1, "small": 2, "40b-shape": 16}


def preset_config(preset: str, dtype: str) -> LoopConfig:
    if preset not in PRESETS:
        raise UserError(f"preset {preset!r} unknown; allowed: {sorted(PRESETS)}")
    d = dict(model_type="iquestloopcoder", architectures=["IQuestLoopCoderForCausalLM"], rope_theta=500000.0,
             rms_norm_eps=1e-5, tie_word_embeddings=False, loop_num=2, bos_token_id=1, eos_token_id=2,
             torch_dtype=dtype)
    d.update(PRESETS[preset])
    return LoopConfig.from_dict(d, source=f"preset {preset}")


def random_weights(cfg: LoopConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hd, H, D, F = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size

    def normal(shape, std):
        return (torch.randn(shape, generator=g) * std).to(dtype)

    std = {"q_proj": 1.2 / math.sqrt(hd), "k_proj": 1.2 / math.sqrt(hd), "v_proj": 1 / math.sqrt(hd),
           "o_proj": 0.7 / math.sqrt(H * D), "gate_proj": 1 / math.sqrt(hd), "up_proj": 1 / math.sqrt(hd),
           "down_proj": 0.7 / math.sqrt(F)}
    sd = {}
    for name, shape in cfg.tensor_shapes().items():
        leaf = name.split(".")[-2]
        if name == "model.embed_tokens.weight":
            sd[name] = normal(shape, 2 / math.sqrt(hd) if cfg.tie_word_embeddings else 1.0)
        elif name == "lm_head.weight":
            sd[name] = normal(shape, 2 / math.sqrt(hd))
        elif name.endswith("norm.weight"):
            sd[name] = (1 + torch.randn(shape, generator=g) * 0.1).to(dtype)
        elif "gate_projections" in name:
            sd[name] = torch.full(shape, 2.0, dtype=dtype) if name.endswith("bias") else normal(shape, 0.1 / math.sqrt(D))
        else:
            sd[name] = normal(shape, std[leaf])
    return sd


def _index(cfg: LoopConfig, n_shards: int, bytes_per: int) -> tuple[dict, dict[str, str]]:
    names = list(cfg.tensor_shapes())
    per = math.ceil(len(names) / n_shards)
    wm = {n: f"model-{i // per + 1:05d}-of-{n_shards:05d}.safetensors" for i, n in enumerate(names)}
    return {"metadata": {"total_size": cfg.num_parameters() * bytes_per}, "weight_map": wm}, wm


def synthesize(out_dir: str | Path, preset: str = "tiny", seed: int = 0, dtype: str = "bfloat16",
               tokenizer: bool = True, overwrite: bool = False) -> Path:
    """Write a checkpoint directory atomically (temp dir next to ``out_dir``, renamed at the end)."""
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if tdt is None:
        raise UserError(f"--dtype {dtype!r} unknown; allowed: float32, bfloat16, float16")
    cfg = preset_config(preset, dtype)
    with atomic_dir(out_dir, overwrite, "choose a new directory or pass --force") as tmp:
        conf = cfg.to_dict()
        gen_cfg = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_id),
                   "temperature": 0.6, "top_p": 0.85, "top_k": 20, "do_sample": True}
        if tokenizer and preset != "40b-shape":
            special = write_tokenizer(tmp, cfg.vocab_size)
            conf.update(special)
            gen_cfg.update({k: v for k, v in special.items() if k in ("bos_token_id", "eos_token_id")})
            cfg = LoopConfig.from_dict(conf, source="synth")  # validate the tokenizer's ids
        n_shards = SHARDS[preset]
        bytes_per = torch.tensor([], dtype=tdt).element_size()
        if preset == "40b-shape":
            index, _ = _index(cfg, n_shards, bytes_per)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        else:
            sd = random_weights(cfg, seed, tdt)
            if n_shards == 1:
                save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            else:
                index, wm = _index(cfg, n_shards, bytes_per)
                for shard in sorted(set(wm.values())):
                    save_file({n: sd[n] for n in wm if wm[n] == shard}, str(tmp / shard), metadata={"format": "pt"})
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    return Path(out_dir)
