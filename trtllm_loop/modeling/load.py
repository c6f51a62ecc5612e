"""Build the reference model from a checkpoint directory in any format ``trtllm_loop.checkpoint`` reads.

Strict and loud: the first missing, unexpected or misshapen tensor is named with the file and the fix.
"""
from __future__ import annotations

from pathlib import Path

import torch

from trtllm_loop.config import LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.modeling.emulate import emulate_nvfp4_activations

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} unknown; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


def check_state_dict(cfg: LoopConfig, sd: dict[str, torch.Tensor], source: str) -> None:
    expected = cfg.tensor_shapes()
    for name, shape in expected.items():
        if name not in sd:
            hint = (" (the loop gate: exporters that drop it produce a model that runs with g = 0.5 and wrong "
                    "outputs; re-export including model.gate_projections.*)" if "gate_projections" in name else "")
            raise UserError(f"{source}: tensor {name!r} is missing{hint}")
        if tuple(sd[name].shape) != shape:
            raise UserError(f"{source}: tensor {name!r} has shape {list(sd[name].shape)}, expected {list(shape)} "
                            "from config.json; the checkpoint and its config.json do not match")
    extra = sorted(set(sd) - set(expected) - {"lm_head.weight"})
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all); "
                        "this is not an IQuestLoopCoder checkpoint for this config.json")


def load_model(ckpt: str | Path, dtype: str | torch.dtype = "float32", emulate_activations: str | None = None):
    """-> ``IQuestLoopCoderForCausalLM`` in eval mode with the checkpoint's (dequantized) weights.

    ``emulate_activations="nvfp4"``: also quantize every Linear input the way W4A4 NVFP4 kernels do (dynamic
    per-16 FP8 scales under the checkpoint's static ``input_scale``).
    """
    from trtllm_loop.checkpoint import load_checkpoint
    from trtllm_loop.modeling import IQuestLoopCoderConfig, IQuestLoopCoderForCausalLM

    dt = torch_dtype(dtype)
    cfg = LoopConfig.from_file(ckpt)
    if emulate_activations not in (None, "nvfp4"):
        raise UserError(f"--emulate-activations {emulate_activations!r} unknown; allowed: nvfp4")
    ck = load_checkpoint(ckpt, dt)
    sd = ck.state_dict
    if emulate_activations and not ck.input_scales:
        raise UserError(f"{ckpt}: --emulate-activations nvfp4 needs the static activation scales (input_scale) of a "
                        "W4A4 NVFP4 export; this checkpoint has none (dense or weight-only)")
    check_state_dict(cfg, sd, str(ckpt))
    with torch.device("meta"):
        model = IQuestLoopCoderForCausalLM(IQuestLoopCoderConfig.from_loop_config(cfg))
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(dt).eval()
    if emulate_activations:
        emulate_nvfp4_activations(model, ck.input_scales, ck.pre_quant_scales)
    return model
