"""The real exports (tests/fixtures/nvfp4, built by scripts/make_nvfp4_fixtures.py with ModelOpt 0.47.0 and
llm-compressor 0.14.0.1 on CPU): re-quantizing the original weights reproduces every stored byte; the
readers dequantize within the format's bound; calibration saw both loop passes; logits on the export equal
logits of the model with the dequantized weights written out densely."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from trtllm_loop import nvfp4
from trtllm_loop.checkpoint import describe_checkpoint, detect_format, load_checkpoint, load_state_dict
from trtllm_loop.checkpoint.validate import validate

FIX = Path(__file__).parent / "fixtures" / "nvfp4"
MODELOPT = ["modelopt_nvfp4", "modelopt_w4a16_nvfp4", "modelopt_nvfp4_fp8kv"]
LLMC = ["llmc_nvfp4", "llmc_nvfp4a16"]
W4A4 = ["modelopt_nvfp4", "modelopt_nvfp4_fp8kv", "llmc_nvfp4"]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def source():
    return load_file(FIX / "source" / "model.safetensors")  # bf16 originals the exporters started from


def stored(name):
    return load_file(FIX / name / "model.safetensors")


def prefixes():
    return [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]


@pytest.mark.parametrize("name", MODELOPT + LLMC)
def test_requantizing_the_originals_reproduces_every_byte(name, source):
    st = stored(name)
    compared = 0
    for p in prefixes():
        w = source[f"{p}.weight"]
        if name in LLMC:
            packed, scale, _ = nvfp4.quantize_ct(w, st[f"{p}.weight_global_scale"])
            ref_packed = st[f"{p}.weight_packed"]
        else:
            packed, scale, _ = nvfp4.quantize(w, st[f"{p}.weight_scale_2"])
            ref_packed = st[f"{p}.weight"]
        assert torch.equal(packed, ref_packed), p
        assert torch.equal(scale.view(torch.uint8), st[f"{p}.weight_scale"].view(torch.uint8)), p
        compared += packed.numel() + scale.numel()
    assert compared == 34560


@pytest.mark.parametrize("name", MODELOPT + LLMC)
def test_dequantized_weights_within_format_bound(name, source):
    sd = load_state_dict(FIX / name)
    for p in prefixes():
        w = source[f"{p}.weight"].float()
        d = sd[f"{p}.weight"]
        assert d.dtype == torch.float32 and d.shape == w.shape
        n, k = w.shape
        err = (d - w).view(n, k // 16, 16).abs().amax(-1) / w.view(n, k // 16, 16).abs().amax(-1)
        assert float(err.max()) <= 0.177, p
        assert float((d - w).norm() / w.norm()) < 0.12, p
    # scale tensors are gone; unquantized tensors pass through unchanged
    assert not [k for k in sd if k.rsplit(".", 1)[1] != "weight" and k.rsplit(".", 1)[1] != "bias"]
    assert torch.equal(sd["model.gate_projections.0.weight"], source["model.gate_projections.0.weight"].float())


def test_global_scales_are_reciprocal_between_producers():
    mo, ct = stored("modelopt_nvfp4"), stored("llmc_nvfp4")
    for p in prefixes():
        g_mo = float(mo[f"{p}.weight_scale_2"])
        g_ct = float(ct[f"{p}.weight_global_scale"][0])
        assert mo[f"{p}.weight_scale_2"].shape == () and ct[f"{p}.weight_global_scale"].shape == (1,)
        assert g_mo * g_ct == pytest.approx(1.0, rel=5e-3)  # CT rounds its divisor to bf16
        assert float(torch.tensor(g_ct).to(torch.bfloat16)) == g_ct


def test_calibration_saw_both_passes():
    """ModelOpt's input_scale = max(pass-1, pass-2) input amax / (6 * 448), max over a fused group."""
    amax = json.loads((FIX / "calib_amax.json").read_text())["amax"]
    st = stored("modelopt_nvfp4")
    pass2_wins = pass1_wins = 0
    for p in prefixes():
        group = [p]
        for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            if p.rsplit(".", 1)[1] in fused:
                group = [p.rsplit(".", 1)[0] + "." + f for f in fused]
        want = max(max(amax[g]["pass1"], amax[g]["pass2"]) for g in group) / 2688
        assert float(st[f"{p}.input_scale"]) == pytest.approx(want, rel=1e-6), p
        pass2_wins += amax[p]["pass2"] > amax[p]["pass1"]
        pass1_wins += amax[p]["pass1"] > amax[p]["pass2"]
    assert pass2_wins >= 3 and pass1_wins >= 1  # the data exercises both directions
    ct = stored("llmc_nvfp4")
    for p in prefixes():  # llm-compressor: input_global_scale = bf16(2688 / amax) of the same data
        got = float(ct[f"{p}.input_global_scale"][0])
        assert 2688 / got == pytest.approx(max(amax[p]["pass1"], amax[p]["pass2"]), rel=1e-2), p


def test_fp8_kv_scales_reported():
    ck = load_checkpoint(FIX / "modelopt_nvfp4_fp8kv")
    assert sorted(ck.kv_scales) == sorted(f"model.layers.{i}.self_attn.{x}_proj.{x}_scale"
                                          for i in range(2) for x in "kv")
    assert all(0 < float(v) < 1 for v in ck.kv_scales.values())
    assert not any("k_scale" in k or "v_scale" in k for k in ck.state_dict)
    info = detect_format(FIX / "modelopt_nvfp4_fp8kv")
    assert (info.format, info.quant_algo, info.kv_cache_quant, info.group_size) == ("modelopt", "NVFP4", "FP8", 16)


@pytest.mark.parametrize("name, fmt, algo, scales", [
    ("modelopt_nvfp4", "modelopt", "NVFP4", 14), ("modelopt_w4a16_nvfp4", "modelopt", "W4A16_NVFP4", 0),
    ("llmc_nvfp4", "compressed-tensors", "NVFP4", 14), ("llmc_nvfp4a16", "compressed-tensors", "NVFP4A16", 0),
    ("source", "hf", None, 0)])
def test_detect_validate_and_input_scales(name, fmt, algo, scales):
    info = detect_format(FIX / name)
    assert (info.format, info.quant_algo) == (fmt, algo)
    assert validate(FIX / name) == []
    sd, ins = load_state_dict(FIX / name, return_input_scales=True)
    assert len(ins) == scales
    d = describe_checkpoint(FIX / name)
    assert d["format"] == fmt and d["findings"] == []
    if fmt != "hf":
        assert d["group_size"] == 16 and "lm_head" in d["exclude_modules"]
        assert d["module_kinds"]["nvfp4-" + ("ct" if fmt == "compressed-tensors" else "modelopt")] == 14


def _independent_dense_copy(quant: Path, out: Path) -> Path:
    """Dequantize with the doc's formula (written here, not the library's) into a dense fp32 checkpoint."""
    st = load_file(quant / "model.safetensors")
    table = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
    dense = {}
    for k, v in st.items():
        p, suffix = k.rsplit(".", 1)
        if suffix in ("weight_packed",) or (suffix == "weight" and v.dtype == torch.uint8):
            codes = torch.stack((v & 0xF, v >> 4), -1).reshape(v.shape[0], -1).long()
            s = st[f"{p}.weight_scale"].float()
            g = st[f"{p}.weight_scale_2"] if f"{p}.weight_scale_2" in st else 1 / st[f"{p}.weight_global_scale"]
            w = table[codes].view(v.shape[0], -1, 16) * s.unsqueeze(-1)
            dense[f"{p}.weight"] = w.flatten(1) * g.float().reshape(())
        elif suffix in ("weight", "bias"):
            dense[k] = v.float()
    out.mkdir()
    save_file(dense, out / "model.safetensors")
    cfg = json.loads((quant / "config.json").read_text())
    cfg.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("name", ["modelopt_nvfp4", "llmc_nvfp4"])
def test_logits_on_export_equal_dequantized_model(name, tmp_path):
    from trtllm_loop.conformance import compute
    ids = json.loads((FIX / "source" / "input_ids.json").read_text())
    dense = _independent_dense_copy(FIX / name, tmp_path / "dense")
    for mode in ("prefill", "decode", "paged"):
        q, = compute(str(FIX / name), [ids], mode)
        d, = compute(str(dense), [ids], mode)
        assert q.shape == (29, 128)
        assert float(np.abs(q - d).max()) <= 1e-4, mode



def test_nvfp4_awq_pre_quant_scale_folded(source):
    """ModelOpt NVFP4_AWQ (awq_lite, CPU shim): the loop model's functional RMSNorm gives ModelOpt nothing to
    fold into, so every Linear keeps an explicit pre_quant_scale; the dense weight is W_ckpt * pqs."""
    name = "modelopt_nvfp4_awq"
    info = detect_format(FIX / name)
    assert (info.format, info.quant_algo, info.group_size) == ("modelopt", "NVFP4_AWQ", 16)
    assert validate(FIX / name) == []
    ck = load_checkpoint(FIX / name)
    assert sorted(ck.pre_quant_scales) == sorted(prefixes()) and len(ck.input_scales) == 14
    st = stored(name)
    for p in prefixes():
        w = source[f"{p}.weight"].float()
        pqs = st[f"{p}.pre_quant_scale"].float()
        assert not torch.allclose(pqs, torch.ones_like(pqs))  # AWQ did smooth
        assert float((ck.state_dict[f"{p}.weight"] - w).norm() / w.norm()) < 0.12, p
        without = nvfp4.dequantize(st[f"{p}.weight"], st[f"{p}.weight_scale"], st[f"{p}.weight_scale_2"])
        assert torch.allclose(ck.state_dict[f"{p}.weight"], without * pqs)


def test_modelopt_fp8_export_reads_within_fp8_error(source):
    sd = load_state_dict(FIX / "modelopt_fp8")
    for p in prefixes():
        w = source[f"{p}.weight"].float()
        assert float((sd[f"{p}.weight"] - w).abs().max()) <= float(w.abs().max()) / 16, p


def test_w4a4_emulation_hooks_every_quantized_linear():
    from trtllm_loop.modeling.load import load_model
    from trtllm_loop.modeling.emulate import emulate_nvfp4_activations
    sd, scales = load_state_dict(FIX / "modelopt_nvfp4", return_input_scales=True)
    model = load_model(FIX / "modelopt_nvfp4")
    ids = torch.tensor([json.loads((FIX / "source" / "input_ids.json").read_text())])
    with torch.no_grad():
        plain = model(ids).logits
        handles = emulate_nvfp4_activations(model, scales)
        assert len(handles) == 14
        seen = {}

        def record(_m, inp, out):
            seen.setdefault("io", (inp[0].clone(), out.clone()))
        probe = model.get_submodule(prefixes()[3]).register_forward_hook(record)
        emulated = model(ids).logits
        probe.remove()
        for h in handles:
            h.remove()
        again = model(ids).logits
    x_q, y = seen["io"]  # the hook saw the already fake-quantized input of o_proj
    assert torch.equal(nvfp4.fake_quant_activation(x_q, scales[prefixes()[3]]), x_q)  # idempotent on the grid
    assert torch.allclose(y, x_q @ sd[f"{prefixes()[3]}.weight"].T, atol=1e-5)
    assert torch.equal(plain, again) and not torch.allclose(plain, emulated, atol=1e-3)
    assert 0 < float((emulated - plain).abs().max()) < 5
