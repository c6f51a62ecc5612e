"""convert (NVFP4 / BF16 -> ModelOpt FP8 or BF16), --fix-fused-scales and eval-quant."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trtllm_loop import nvfp4
from trtllm_loop.checkpoint import load_checkpoint, load_state_dict
from trtllm_loop.checkpoint.validate import validate
from trtllm_loop.cli import main
from trtllm_loop.errors import UserError
from trtllm_loop.quantize.convert import convert
from trtllm_loop.quantize.evaluate import compare_logits, eval_quant
from trtllm_loop.quantize.fix_fused import fix_fused_scales

FIX = Path(__file__).parent / "fixtures" / "nvfp4"
IDS = json.loads((FIX / "source" / "input_ids.json").read_text())
K = "model.layers.0.self_attn.k_proj"


def calib_sequences():  # the calibration data of scripts/make_nvfp4_fixtures.py (seed 1234, 8 x 2 x 32)
    g = torch.Generator().manual_seed(1234)
    return [row.tolist() for _ in range(8) for row in torch.randint(3, 128, (2, 32), generator=g)]


def test_fp8_from_bf16_matches_modelopt_bytes(tmp_path):
    out = tmp_path / "fp8"
    rep = convert(FIX / "source", out, "fp8", calib_ids=calib_sequences())
    assert rep["fp8_linears"] == 14
    ours, theirs = load_file(out / "model.safetensors"), load_file(FIX / "modelopt_fp8" / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in theirs.items()}
    for k, v in theirs.items():
        if v.dtype == torch.float8_e4m3fn or k.endswith("weight_scale"):
            assert torch.equal(ours[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else ours[k],
                               v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v), k
        elif k.endswith("input_scale"):  # ModelOpt calibrated in bf16, we in fp32
            assert float(ours[k]) == pytest.approx(float(v), rel=2e-2), k
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "FP8" and hq["kv_cache_quant_algo"] is None
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    assert validate(out) == []


@pytest.mark.parametrize("src", ["modelopt_nvfp4", "llmc_nvfp4", "modelopt_nvfp4_fp8kv"])
def test_fp8_from_nvfp4_loads_and_is_close(src, tmp_path):
    s = tmp_path / "src"
    shutil.copytree(FIX / src, s)
    (s / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    out = tmp_path / "fp8"
    convert(s, out, "fp8")
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 4096}'
    assert not list(tmp_path.glob(".fp8.tmp*"))
    assert validate(out) == []
    ref, ck = load_checkpoint(s), load_checkpoint(out)
    st = load_file(out / "model.safetensors")
    for name, w_ref in ref.state_dict.items():
        w = ck.state_dict[name]
        if name.endswith("proj.weight") and "gate_projections" not in name:
            assert st[name].dtype == torch.float8_e4m3fn
            assert float((w - w_ref).abs().max()) <= float(w_ref.abs().max()) / 16 + 1e-12, name  # FP8 e4m3 step
            p = name[:-len(".weight")]
            assert float(st[f"{p}.input_scale"]) == pytest.approx(float(ref.input_scales[p]) * 6, rel=1e-6)
    assert ck.kv_scales.keys() == ref.kv_scales.keys()
    rep = eval_quant(str(s), str(out), [IDS])["summary"]
    assert rep["kl_mean"] < 0.01 and rep["top1_agreement"] >= 0.85  # NVFP4 vs its bf16 source: KL ~0.1


def test_fp8_needs_calibration_for_weight_only(tmp_path):
    with pytest.raises(UserError, match="--calib-ids"):
        convert(FIX / "llmc_nvfp4a16", tmp_path / "out", "fp8")
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    convert(FIX / "llmc_nvfp4a16", tmp_path / "out", "fp8", calib_ids=[IDS])
    assert validate(tmp_path / "out") == []


def test_bf16_output_and_sharding(tmp_path):
    out = tmp_path / "bf16"
    convert(FIX / "modelopt_w4a16_nvfp4", out, "bf16", max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    a, b = load_state_dict(out), load_state_dict(FIX / "modelopt_w4a16_nvfp4")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k].to(torch.bfloat16).float()), k


def test_convert_broken_source_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIX / "modelopt_nvfp4", src)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        convert(src, tmp_path / "out", "fp8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        convert(FIX / "modelopt_nvfp4", tmp_path / "busy", "bf16")


def test_cli_convert_failure_exit_code(tmp_path, capsys):
    assert main(["convert", str(FIX / "llmc_nvfp4a16"), str(tmp_path / "o"), "--to", "fp8"]) == 2
    assert "--calib-ids" in capsys.readouterr().err


def _unfused(tmp_path, fixture, factor):
    """Re-quantize k_proj (or gate_proj for CT) under a different global scale than its fused siblings."""
    d = tmp_path / "unfused"
    shutil.copytree(FIX / fixture, d)
    sd = load_file(d / "model.safetensors")
    src = load_file(FIX / "source" / "model.safetensors")
    if fixture.startswith("modelopt"):
        p, g = K, sd[f"{K}.weight_scale_2"] * factor
        sd[f"{p}.weight"], sd[f"{p}.weight_scale"], sd[f"{p}.weight_scale_2"] = nvfp4.quantize(src[f"{p}.weight"], g)
    else:
        p = "model.layers.1.mlp.gate_proj"
        gs = sd[f"{p}.weight_global_scale"] / factor
        sd[f"{p}.weight_packed"], sd[f"{p}.weight_scale"], sd[f"{p}.weight_global_scale"] = \
            nvfp4.quantize_ct(src[f"{p}.weight"], gs)
    save_file(sd, d / "model.safetensors")
    return d, p


@pytest.mark.parametrize("fixture", ["modelopt_nvfp4", "llmc_nvfp4"])
def test_unequal_fused_scales_rejected_then_fixed_exactly(tmp_path, fixture):
    d, p = _unfused(tmp_path, fixture, 0.5)
    errs = [str(f) for f in validate(d) if f.level == "error"]
    assert len(errs) == 1 and "different weight global scales" in errs[0] and "--fix-fused-scales" in errs[0]
    before = load_state_dict(d)
    rep = fix_fused_scales(d, tmp_path / "fixed")
    assert rep["changed"] == 1 and rep["requantized_blocks"] == 0 and "exact" in rep["message"]
    assert validate(tmp_path / "fixed") == []
    after = load_state_dict(tmp_path / "fixed")
    assert all(torch.equal(before[k], after[k]) for k in before)
    key = "weight" if fixture.startswith("modelopt") else "weight_packed"
    assert torch.equal(load_file(d / "model.safetensors")[f"{p}.{key}"],
                       load_file(tmp_path / "fixed" / "model.safetensors")[f"{p}.{key}"])  # 4-bit values untouched


def test_fix_fused_scales_says_when_inexact(tmp_path, capsys):
    d, p = _unfused(tmp_path, "modelopt_nvfp4", 0.7)
    assert main(["validate", str(d)]) == 1
    assert main(["validate", str(d), "--fix-fused-scales", str(tmp_path / "fixed")]) == 0
    out = capsys.readouterr().out
    assert "re-quantized (lossy)" in out and "OK" in out
    w, w_fixed = load_state_dict(d)[f"{p}.weight"], load_state_dict(tmp_path / "fixed")[f"{p}.weight"]
    assert float((w - w_fixed).abs().max()) <= 0.25 * float(w.abs().max())


def test_compare_logits_known_values():
    import numpy as np
    ref = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    q = np.array([[np.log(3.0), 0.0], [1.0, 0.0], [1.0, 0.0]])
    r = compare_logits(ref, q)
    p = np.exp(1) / (1 + np.exp(1))  # row 2: p = (1 - p, p) vs q = (p, 1 - p)
    assert r["per_position"]["kl"] == pytest.approx([0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25), 0.0,
                                                     (2 * p - 1) * np.log(p / (1 - p))])
    assert r["per_position"]["top1"] == [True, True, False]
    assert r["top1_agreement"] == pytest.approx(2 / 3)
    assert r["per_position"]["max_abs_dlogit"] == pytest.approx([np.log(3.0), 0.0, 1.0])
    assert r["max_abs_dlogit"] == pytest.approx(np.log(3.0))


def test_cli_eval_quant_table_and_json(tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(IDS[:12]))
    out = tmp_path / "rep.json"
    assert main(["eval-quant", str(FIX / "source"), str(FIX / "source"), "--ids", str(ids), "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["summary"] == {"positions": 12, "kl_mean": 0.0, "kl_max": 0.0, "top1_agreement": 1.0,
                              "max_abs_dlogit": 0.0}
    assert main(["eval-quant", str(FIX / "source"), str(FIX / "llmc_nvfp4"), "--ids", str(ids),
                 "--emulate-activations", "nvfp4", "--json", str(out)]) == 0
    s = json.loads(out.read_text())["summary"]
    text = capsys.readouterr().out
    assert "KL mean" in text and "top-1" in text
    assert 0 < s["kl_mean"] < 1 and 0 < s["max_abs_dlogit"] < 10


def test_fix_fused_scales_refuses_other_errors(tmp_path):
    d, p = _unfused(tmp_path, "modelopt_nvfp4", 0.5)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight_scale_2"] = torch.tensor(0.0)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(UserError, match=r"fix these first:\n.*down_proj.weight_scale_2.*1 zero"):
        fix_fused_scales(d, tmp_path / "fixed")
    assert not (tmp_path / "fixed").exists()
