"""``convert SRC OUT --to trtllm-ckpt [--tp N]``: the TensorRT-LLM engine-flow checkpoint -- config.json, TRT-LLM
names, the PyTorch backend's tensor-parallel split, NVFP4 / FP8 kept quantized under TRT-LLM's names, gates
never quantized, refusals with the fix."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_checkpoint, unequal_fused_scales
from trtllm_loop import nvfp4
from trtllm_loop.checkpoint import load_state_dict
from trtllm_loop.cli import main
from trtllm_loop.errors import UserError
from trtllm_loop.trtllm.engine.checkpoint import convert_trtllm

FIX = "tests/fixtures/nvfp4"


def test_config_names_and_the_tensor_parallel_split(tmp_path):
    """4 heads, 2 KV heads, head_dim 12: TP 4 gives each rank one q head and (replicated) KV head r // 2."""
    d, conf, w = make_checkpoint(tmp_path / "hf", num_attention_heads=4, num_key_value_heads=2, vocab_size=98)
    rep = convert_trtllm(d, tmp_path / "ck", tp=4)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert (cfg["architecture"], cfg["num_hidden_layers"], cfg["num_unique_layers"], cfg["loop_window_size"]) == \
        ("IQuestLoopCoderForCausalLM", 4, 2, 8)
    assert cfg["mapping"] == {"world_size": 4, "tp_size": 4, "pp_size": 1} and cfg["quantization"]["quant_algo"] is None
    assert (cfg["position_embedding_type"], cfg["rotary_base"], cfg["head_size"]) == ("rope_gpt_neox", 500000.0, 12)
    assert rep["quantization"] is None and rep["dtype"] == "float32"
    Hkv, D, hid = 2, 12, 48
    for r in range(4):
        sd = load_file(str(tmp_path / "ck" / f"rank{r}.safetensors"))
        p = "transformer.layers.1."
        q = w["model.layers.1.self_attn.q_proj.weight"][r * D:(r + 1) * D]
        kv = r * Hkv // 4
        k = w["model.layers.1.self_attn.k_proj.weight"][kv * D:(kv + 1) * D]
        v = w["model.layers.1.self_attn.v_proj.weight"][kv * D:(kv + 1) * D]
        np.testing.assert_array_equal(sd[p + "attention.qkv.weight"].numpy(), np.concatenate([q, k, v]))
        np.testing.assert_array_equal(sd[p + "attention.dense.weight"].numpy(),
                                      w["model.layers.1.self_attn.o_proj.weight"][:, r * D:(r + 1) * D])
        F = conf["intermediate_size"] // 4
        np.testing.assert_array_equal(sd[p + "mlp.fc.weight"].numpy(),
                                      w["model.layers.1.mlp.gate_proj.weight"][r * F:(r + 1) * F])
        np.testing.assert_array_equal(sd[p + "mlp.gate.weight"].numpy(),
                                      w["model.layers.1.mlp.up_proj.weight"][r * F:(r + 1) * F])
        np.testing.assert_array_equal(sd[p + "mlp.proj.weight"].numpy(),
                                      w["model.layers.1.mlp.down_proj.weight"][:, r * F:(r + 1) * F])
        np.testing.assert_array_equal(sd["transformer.gate_projections.1.weight"].numpy(),
                                      w["model.gate_projections.1.weight"][r:r + 1])
        np.testing.assert_array_equal(sd["transformer.vocab_embedding.weight"].numpy(), w["model.embed_tokens.weight"])
        lm = sd["lm_head.weight"].numpy()  # vocab 98 padded to 100: 25 rows per rank, zeros at the end
        assert lm.shape == (25, hid)
        full = np.concatenate([w["lm_head.weight"], np.zeros((2, hid))])
        np.testing.assert_array_equal(lm, full[r * 25:(r + 1) * 25])
        assert set(sd) == {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"} | {
            f"transformer.layers.{l}.{n}.weight" for l in range(2) for n in (
                "input_layernorm", "attention.qkv", "attention.dense", "post_layernorm", "mlp.fc", "mlp.gate",
                "mlp.proj")} | {f"transformer.gate_projections.{l}.{n}" for l in range(2) for n in ("weight", "bias")}


def test_nvfp4_keeps_its_bytes_under_trtllm_names(tmp_path):
    src = f"{FIX}/modelopt_nvfp4"
    assert main(["convert", src, str(tmp_path / "ck"), "--to", "trtllm-ckpt", "--tp", "2"]) == 0
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    q = cfg["quantization"]
    assert q["quant_algo"] == "NVFP4" and q["group_size"] == 16
    assert {"lm_head", "transformer.vocab_embedding", "transformer.gate_projections.*"} <= set(q["exclude_modules"])
    hf = load_file(f"{src}/model.safetensors")
    dense = load_state_dict(src)
    for r in range(2):
        sd = load_file(str(tmp_path / "ck" / f"rank{r}.safetensors"))
        p, s = "transformer.layers.0.attention.qkv.", "model.layers.0.self_attn."
        assert sd[p + "weight"].dtype == torch.uint8 and sd[p + "weights_scaling_factor"].dtype == torch.float8_e4m3fn
        assert sd[p + "weights_scaling_factor_2"].shape == (1,) and sd[p + "activation_scaling_factor"].shape == (1,)
        assert float(sd[p + "weights_scaling_factor_2"]) == float(hf[s + "q_proj.weight_scale_2"])
        assert float(sd[p + "activation_scaling_factor"]) == max(float(hf[s + f"{x}_proj.input_scale"]) for x in "qkv")
        # the rank's fused qkv dequantizes to the dense q/k/v rows of its heads (2 q heads, 1 KV head of 16 rows)
        got = nvfp4.dequantize_rows(sd[p + "weight"], sd[p + "weights_scaling_factor"],
                                    sd[p + "weights_scaling_factor_2"].reshape(()))
        want = torch.cat([dense[s + "q_proj.weight"][r * 32:(r + 1) * 32], dense[s + "k_proj.weight"][r * 16:(r + 1) * 16],
                          dense[s + "v_proj.weight"][r * 16:(r + 1) * 16]])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # row-parallel: the packed columns of this rank's inputs, block scales alike
        dn, o = "transformer.layers.0.attention.dense.", "model.layers.0.self_attn.o_proj."
        torch.testing.assert_close(sd[dn + "weight"], hf[o + "weight"][:, r * 16:(r + 1) * 16], rtol=0, atol=0)
        assert torch.equal(sd[dn + "weights_scaling_factor"].view(torch.uint8),
                           hf[o + "weight_scale"][:, r * 2:(r + 1) * 2].view(torch.uint8))
        assert sd["transformer.gate_projections.0.weight"].dtype == torch.bfloat16  # never quantized


def test_nvfp4_with_unequal_fused_global_scales_is_refused_with_the_fix(tmp_path):
    d = unequal_fused_scales(tmp_path)
    with pytest.raises(UserError, match="different weight global scales.*--fix-fused-scales"):
        convert_trtllm(d, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_fp8_fused_qkv_is_requantized_to_the_max_scale(tmp_path):
    src = f"{FIX}/modelopt_fp8"
    convert_trtllm(src, tmp_path / "ck")
    hf, sd = load_file(f"{src}/model.safetensors"), load_file(str(tmp_path / "ck" / "rank0.safetensors"))
    p, s = "transformer.layers.1.attention.qkv.", "model.layers.1.self_attn."
    scales = [float(hf[s + f"{x}_proj.weight_scale"]) for x in "qkv"]
    assert float(sd[p + "weights_scaling_factor"]) == max(scales) and sd[p + "weight"].dtype == torch.float8_e4m3fn
    got = sd[p + "weight"].float() * max(scales)
    want = torch.cat([hf[s + f"{x}_proj.weight"].float() * sc for x, sc in zip("qkv", scales)])
    assert float((got - want).abs().max()) <= float(want.abs().max()) * 2 ** -3  # one FP8 rounding step
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["quantization"]["quant_algo"] == "FP8"


def test_refusals_name_the_flag_and_the_fix(tmp_path):
    d, _, _ = make_checkpoint(tmp_path / "hf", num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(UserError, match="tensor parallel size 3 does not fit"):
        convert_trtllm(d, tmp_path / "ck", tp=3)
    with pytest.raises(UserError, match="not a TensorRT-LLM 1.2 engine-flow QuantAlgo.*--to bf16"):
        convert_trtllm(f"{FIX}/modelopt_w4a16_nvfp4", tmp_path / "ck")
    with pytest.raises(UserError, match="quantized"):  # quantized k/v heads cannot be replicated
        convert_trtllm(f"{FIX}/modelopt_nvfp4", tmp_path / "ck", tp=4)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(UserError, match="--force"):
        convert_trtllm(d, tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep"
    assert main(["convert", str(d), str(tmp_path / "o"), "--to", "fp8", "--tp", "2"]) == 2
