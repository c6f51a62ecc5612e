"""The validator's bad-input matrix: each broken export (made in a tmp dir from a real ModelOpt or
llm-compressor fixture) is rejected with a message naming the file, the tensor and the fix."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trtllm_loop.checkpoint import load_state_dict
from trtllm_loop.checkpoint.validate import check, validate
from trtllm_loop.errors import UserError

FIX = Path(__file__).parent / "fixtures" / "nvfp4"
Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"


def broken(tmp_path, fixture="modelopt_nvfp4", edit=None, name="ckpt"):
    """Copy a fixture; ``edit(state_dict)`` mutates its tensors in place."""
    d = tmp_path / name
    shutil.copytree(FIX / fixture, d)
    if edit:
        sd = load_file(d / "model.safetensors")
        edit(sd)
        save_file(sd, d / "model.safetensors")
    return d


def errors(d):
    return [f for f in validate(d) if f.level == "error"]


def one_error(d, *needles, tensor=None):
    errs = errors(d)
    assert len(errs) >= 1, "expected a validation error"
    text = [str(e) for e in errs]
    hit = [t for t in text if all(n in t for n in needles)]
    assert hit, f"no error containing {needles}: {text}"
    if tensor:
        assert any(e.tensor == tensor for e in errs), [e.tensor for e in errs]
    with pytest.raises(UserError) as ei:
        check(d)
    assert all(n in str(ei.value) for n in needles)
    return hit[0]


def test_real_exports_pass():
    for name in ("modelopt_nvfp4", "modelopt_w4a16_nvfp4", "modelopt_nvfp4_fp8kv", "modelopt_fp8", "llmc_nvfp4",
                 "llmc_nvfp4a16", "source"):
        assert validate(FIX / name) == [], name


def test_truncated_shard(tmp_path):
    d = broken(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    msg = one_error(d, "model.safetensors", "truncated", "copy or download it again")
    with pytest.raises(UserError, match="truncated"):
        load_state_dict(d)
    assert "tensor" in msg


def _shard(d: Path, names_second: list[str]) -> None:
    """Split model.safetensors into two shards plus an index."""
    sd = load_file(d / "model.safetensors")
    a = {k: v for k, v in sd.items() if k not in names_second}
    b = {k: v for k, v in sd.items() if k in names_second}
    save_file(a, d / "model-00001-of-00002.safetensors")
    save_file(b, d / "model-00002-of-00002.safetensors")
    (d / "model.safetensors").unlink()
    wm = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def test_sharded_reader_roundtrip(tmp_path):
    d = broken(tmp_path)
    _shard(d, [k for k in load_file(FIX / "modelopt_nvfp4" / "model.safetensors") if "layers.1." in k])
    assert validate(d) == []
    a, b = load_state_dict(d), load_state_dict(FIX / "modelopt_nvfp4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_shard(tmp_path):
    d = broken(tmp_path)
    _shard(d, [f"{Q}.weight"])
    (d / "model-00002-of-00002.safetensors").unlink()
    one_error(d, "model-00002-of-00002.safetensors", "missing", f"{Q}.weight", "copy the complete checkpoint")


def test_tensor_in_index_but_not_in_shard(tmp_path):
    d = broken(tmp_path)
    _shard(d, ["model.norm.weight"])
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.0.mlp.up_proj.weight_scale"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    one_error(d, "model-00002-of-00002.safetensors", "model.layers.0.mlp.up_proj.weight_scale",
              "not stored in this shard")


def test_tensor_missing_entirely(tmp_path):
    d = broken(tmp_path, edit=lambda sd: sd.pop("model.gate_projections.1.bias"))
    one_error(d, "model.gate_projections.1.bias", "missing", "re-export", tensor="model.gate_projections.1.bias")


def test_missing_scale_tensor(tmp_path):
    d = broken(tmp_path, edit=lambda sd: sd.pop(f"{K}.weight_scale_2"))
    one_error(d, f"{K}.weight_scale_2", "is missing", "re-export", tensor=f"{K}.weight_scale_2")


def test_packed_width_must_be_half(tmp_path):
    def edit(sd):
        sd[f"{Q}.weight"] = torch.zeros(64, 64, dtype=torch.uint8)
    msg = one_error(broken(tmp_path, edit=edit), f"{Q}.weight", "[64, 64]", "expected [64, 32]", "[out, in/2]")
    assert "model.safetensors" in msg


def test_scale_width_must_be_sixteenth(tmp_path):
    def edit(sd):
        sd[f"{Q}.weight_scale"] = torch.ones(64, 8).to(torch.float8_e4m3fn)
    one_error(broken(tmp_path, edit=edit), f"{Q}.weight_scale", "expected [64, 4]", "[out, in/16]")


def test_wrong_scale_dtype(tmp_path):
    def edit(sd):
        sd[f"{Q}.weight_scale"] = sd[f"{Q}.weight_scale"].float()
    one_error(broken(tmp_path, edit=edit), f"{Q}.weight_scale", "dtype F32", "expected F8_E4M3")


def test_wrong_dense_shape(tmp_path):
    def edit(sd):
        sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:100].clone()
    one_error(broken(tmp_path, edit=edit), "model.embed_tokens.weight", "[100, 64]", "[128, 64]")


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (0.0, "zero")])
def test_bad_block_scales(tmp_path, value, word):
    def edit(sd):
        s = sd[f"{Q}.weight_scale"].float()
        s[3, 1] = value
        sd[f"{Q}.weight_scale"] = s.to(torch.float8_e4m3fn)
    one_error(broken(tmp_path, edit=edit), f"{Q}.weight_scale", f"1 {word}", "re-export")


def test_inf_global_scale(tmp_path):
    def edit(sd):
        sd[f"{Q}.weight_scale_2"] = torch.tensor(float("inf"))
    one_error(broken(tmp_path, edit=edit), f"{Q}.weight_scale_2", "1 Inf")


def test_modelopt_scale_in_ct_convention(tmp_path):
    def edit(sd):  # a converter that copied weight_global_scale into weight_scale_2 without inverting
        sd["model.layers.1.self_attn.o_proj.weight_scale_2"] = 1 / sd["model.layers.1.self_attn.o_proj.weight_scale_2"]
    msg = one_error(broken(tmp_path, edit=edit), "model.layers.1.self_attn.o_proj.weight_scale_2", "looks inverted",
                    "fits the compressed-tensors convention", "reciprocal", "store 1/")
    assert "model.safetensors" in msg


def test_ct_scale_in_modelopt_convention(tmp_path):
    def edit(sd):
        for n in ("input_global_scale", "weight_global_scale"):
            sd[f"model.layers.0.mlp.down_proj.{n}"] = 1 / sd[f"model.layers.0.mlp.down_proj.{n}"]
    d = broken(tmp_path, "llmc_nvfp4", edit)
    one_error(d, "model.layers.0.mlp.down_proj.weight_global_scale", "looks inverted", "fits the ModelOpt convention")
    one_error(d, "model.layers.0.mlp.down_proj.input_global_scale", "looks inverted", "activation amax")


def test_quantized_gate_is_rejected(tmp_path):
    def edit(sd):
        sd["model.gate_projections.0.weight"] = torch.zeros(4, 8, dtype=torch.uint8)
        sd["model.gate_projections.0.weight_scale"] = torch.ones(4, 1).to(torch.float8_e4m3fn)
        sd["model.gate_projections.0.weight_scale_2"] = torch.tensor(1e-4)
    one_error(broken(tmp_path, edit=edit), "model.gate_projections.0.weight", "loop gate is quantized",
              "must stay BF16", "gate_projections")


def test_unknown_quantized_tensor(tmp_path):
    def edit(sd):
        for s in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
            sd[f"model.layers.7.self_attn.q_proj.{s}"] = sd[f"{Q}.{s}"].clone()
    one_error(broken(tmp_path, edit=edit), "model.layers.7.self_attn.q_proj.weight", "no such module",
              "different model or config")


def test_unknown_quant_method(tmp_path):
    d = broken(tmp_path, "llmc_nvfp4")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (d / "config.json").write_text(json.dumps(cfg))
    one_error(d, "config.json", "'gptq' is not supported")


def test_describe_reports_findings(tmp_path):
    from trtllm_loop.checkpoint import describe_checkpoint, describe_lines
    d = broken(tmp_path, edit=lambda sd: sd.__setitem__(f"{Q}.weight_scale_2", torch.tensor(float("nan"))))
    desc = describe_checkpoint(d)
    assert (desc["format"], desc["quant_algo"], desc["group_size"]) == ("modelopt", "NVFP4", 16)
    assert desc["exclude_modules"] == ["lm_head", "model.embed_tokens"]
    assert [f["tensor"] for f in desc["findings"]] == [f"{Q}.weight_scale_2"]
    text = "\n".join(describe_lines(desc))
    assert "validation: 1 error(s), 0 warning(s)" in text and "1 NaN" in text and "format modelopt NVFP4" in text


def test_tensor_missing_from_the_index(tmp_path):
    d = broken(tmp_path)
    _shard(d, ["model.norm.weight"])
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    del idx["weight_map"][f"{K}.weight_scale"]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    one_error(d, "model.safetensors.index.json", f"{K}.weight_scale", "stored in model-00001-of-00002",
              "missing from the index", "regenerate", tensor=f"{K}.weight_scale")
