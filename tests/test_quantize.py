"""quantize: every tensor byte-identical to the real ModelOpt 0.47 exports of tests/fixtures/nvfp4 (made by
scripts/make_nvfp4_fixtures.py from the same source, the same calibration samples, one per forward), input scales
= max(pass 1, pass 2) amax, the streamed path = the in-memory path byte for byte, resume, bad input, --report."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trtllm_loop.checkpoint import load_checkpoint
from trtllm_loop.checkpoint.validate import validate
from trtllm_loop.cli import main
from trtllm_loop.config import LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.quantize import pipeline, stream
from trtllm_loop.quantize.calib_data import calibration_samples
from trtllm_loop.quantize.pipeline import quantize

FIX = Path(__file__).parent / "fixtures" / "nvfp4"
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def calib_rows():  # the fixture script's calibration data: seed 1234, 8 batches x 2 rows x 32 tokens
    g = torch.Generator().manual_seed(1234)
    return [r.tolist() for _ in range(8) for r in torch.randint(3, 128, (2, 32), generator=g)]


def jsonl(path: Path, rows, key="input_ids") -> str:
    path.write_text("".join(json.dumps({key: r}) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return jsonl(tmp_path_factory.mktemp("calib") / "calib.jsonl", calib_rows())


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensors(ours: dict, theirs: dict) -> int:
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert (ours[k].dtype, tuple(ours[k].shape)) == (v.dtype, tuple(v.shape)), k
        assert raw(ours[k]) == raw(v), k
    return sum(v.numel() * v.element_size() for v in theirs.values())


CASES = [("modelopt_nvfp4", "nvfp4", "none"), ("modelopt_nvfp4_fp8kv", "nvfp4", "fp8"),
         ("modelopt_w4a16_nvfp4", "w4a16_nvfp4", "none"), ("modelopt_fp8", "fp8", "none")]


@pytest.mark.parametrize("mode", ["memory", "streamed"])
@pytest.mark.parametrize("fixture, qformat, kv", CASES)
def test_every_byte_equals_modelopt(fixture, qformat, kv, mode, calib, tmp_path):
    out = tmp_path / "q"
    rep = quantize(FIX / "source", out, qformat, kv, calib, num_samples=16, seq_len=32, mode=mode)
    assert rep["mode"] == mode and rep["samples"] == 16 and rep["tokens"] == 512
    nbytes = assert_same_tensors(load_file(out / "model.safetensors"), load_file(FIX / fixture / "model.safetensors"))
    assert nbytes > 40000
    theirs_hq = json.loads((FIX / fixture / "hf_quant_config.json").read_text())["quantization"]
    ours_hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert {k: v for k, v in ours_hq.items() if k != "exclude_modules"} == \
        {k: v for k, v in theirs_hq.items() if k != "exclude_modules"}
    assert ours_hq["exclude_modules"] == theirs_hq["exclude_modules"] + ["model.gate_projections*"]
    theirs_qc = json.loads((FIX / fixture / "config.json").read_text())["quantization_config"]
    ours_qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for k in ("config_groups", "quant_algo", "quant_method", "kv_cache_scheme"):
        assert ours_qc.get(k) == theirs_qc.get(k), k
    assert ours_qc["producer"]["name"] == "trtllm-loop"
    assert validate(out) == []
    assert not list(tmp_path.glob(".q.*"))  # no work or temp dir left


def test_fp8_with_fp8_kv(calib, tmp_path):
    """No ModelOpt export of FP8 + FP8 KV: its weights are modelopt_fp8's, its KV scales modelopt_nvfp4_fp8kv's
    (calibration runs unquantized, so the KV amax does not depend on the weight format)."""
    quantize(FIX / "source", tmp_path / "q", "fp8", "fp8", calib, num_samples=16, seq_len=32)
    ours = load_file(tmp_path / "q" / "model.safetensors")
    want = load_file(FIX / "modelopt_fp8" / "model.safetensors")
    kv = load_file(FIX / "modelopt_nvfp4_fp8kv" / "model.safetensors")
    want.update({k: v for k, v in kv.items() if k.endswith(("k_scale", "v_scale"))})
    assert_same_tensors(ours, want)
    hq = json.loads((tmp_path / "q" / "hf_quant_config.json").read_text())["quantization"]
    assert (hq["quant_algo"], hq["kv_cache_quant_algo"]) == ("FP8", "FP8")
    assert sorted(load_checkpoint(tmp_path / "q").kv_scales) == sorted(
        f"model.layers.{i}.self_attn.{x}_proj.{x}_scale" for i in range(2) for x in "kv")


@pytest.mark.parametrize("qformat, div", [("nvfp4", 2688.0), ("fp8", 448.0)])
def test_input_scales_are_max_over_both_passes(qformat, div, calib, tmp_path):
    amax = json.loads((FIX / "calib_amax.json").read_text())["amax"]  # per-pass, recorded by the fixture script
    quantize(FIX / "source", tmp_path / "q", qformat, "none", calib, num_samples=16, seq_len=32)
    st = load_file(tmp_path / "q" / "model.safetensors")
    wins = {"pass1": 0, "pass2": 0}
    for p in amax:
        base, name = p.rsplit(".", 1)
        group = next((g for g in FUSED if name in g), (name,))
        want = max(max(amax[f"{base}.{g}"]["pass1"], amax[f"{base}.{g}"]["pass2"]) for g in group)
        assert float(st[f"{p}.input_scale"]) == float(torch.tensor(want, dtype=torch.float32) / div), p
        wins["pass1" if amax[p]["pass1"] > amax[p]["pass2"] else "pass2"] += 1
    assert wins["pass1"] >= 1 and wins["pass2"] >= 3  # the data needs both passes
    for l in range(2):  # fused groups share their global scales
        for group in FUSED:
            sub = "self_attn" if group[0] == "q_proj" else "mlp"
            keys = ["input_scale"] + (["weight_scale_2"] if qformat == "nvfp4" else [])
            for k in keys:
                assert len({float(st[f"model.layers.{l}.{sub}.{g}.{k}"]) for g in group}) == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from trtllm_loop.synth import synthesize
    return synthesize(tmp_path_factory.mktemp("src") / "tiny", "tiny", seed=5)  # bf16, with a tokenizer


@pytest.mark.parametrize("qformat, kv", [("nvfp4", "fp8"), ("fp8", "none")])
def test_streamed_equals_in_memory_byte_for_byte(qformat, kv, tiny, tmp_path):
    files = {}
    for mode in ("memory", "streamed"):
        quantize(tiny, tmp_path / mode, qformat, kv, "builtin", num_samples=6, seq_len=40, mode=mode)
        files[mode] = {p.name: p.read_bytes() for p in (tmp_path / mode).iterdir() if p.name != ".trtllm-loop-output"}
    assert files["memory"] == files["streamed"]
    assert {"tokenizer.model", "tokenizer_config.json", "generation_config.json", "model.safetensors"} <= \
        set(files["memory"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "streamed"]  # work dir removed


def test_streamed_resumes_after_interruption(tiny, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    quantize(tiny, ref, "nvfp4", "none", "builtin", num_samples=4, seq_len=24, mode="memory")
    calls = []
    real = stream.pass2_step

    def dies_in_layer_1(layer, gate, l, *a):
        calls.append(l)
        if l == 1:
            raise KeyboardInterrupt
        return real(layer, gate, l, *a)

    out = tmp_path / "out"
    monkeypatch.setattr(stream, "pass2_step", dies_in_layer_1)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny, out, "nvfp4", "none", "builtin", num_samples=4, seq_len=24, mode="streamed")
    work = stream.work_dir_for(out)
    assert not out.exists()
    state = json.loads((work / stream.STATE).read_text())
    assert state["done"] == [0, 1, 2]  # pass 1 of both layers, pass 2 of layer 0
    assert sorted(p.name for p in work.glob("*.safetensors")) == ["h.00002.safetensors", "kv.00001.safetensors",
                                                                  "q.00000.safetensors"]
    calls.clear()
    monkeypatch.setattr(stream, "pass2_step", lambda *a: calls.append(a[2]) or real(*a))
    monkeypatch.setattr(stream, "pass1_step", lambda *a: pytest.fail("finished pass-1 steps must be skipped"))
    quantize(tiny, out, "nvfp4", "none", "builtin", num_samples=4, seq_len=24, mode="streamed")
    assert calls == [1] * 4  # only pass 2 of layer 1, once per sample
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert not work.exists()


def test_resume_refuses_other_inputs(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(stream, "pass2_step", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny, out, "nvfp4", "none", "builtin", num_samples=3, seq_len=16, mode="streamed")
    with pytest.raises(UserError, match="interrupted quantize run with other inputs"):
        quantize(tiny, out, "fp8", "none", "builtin", num_samples=3, seq_len=16, mode="streamed")


def test_text_calibration_uses_the_checkpoints_tokenizer(tiny, tmp_path):
    from transformers import AutoTokenizer
    texts = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n"]
    f = jsonl(tmp_path / "t.jsonl", texts, "text")
    samples, held = calibration_samples(f, tiny, 512, 2, 8)
    tok = AutoTokenizer.from_pretrained(str(tiny))
    assert samples == [tok(t, add_special_tokens=False)["input_ids"][:8] for t in texts] and held == []
    assert all(len(s) == 8 for s in samples)


def test_builtin_calibration_is_deterministic_stdlib_code(tiny):
    a, ha = calibration_samples("builtin", tiny, 512, 5, 64, held_out=2)
    b, hb = calibration_samples("builtin", tiny, 512, 5, 64, held_out=2)
    assert a == b and ha == hb and len(a) == 5 and len(ha) == 2
    assert all(len(s) == 64 for s in a + ha) and a[0] != a[1]
    assert len({tuple(s) for s in a + ha}) == 7  # held-out samples are not calibration samples


@pytest.mark.parametrize("content, msg", [
    ("", "0 usable calibration sample"),
    ('{"input_ids": [5, 6, 7]}\n', "1 usable calibration sample.*needs 2"),
    ('{"input_ids": [5]}\n{"input_ids": [5, 6]}\n', ":1: sample has 1 token"),
    ('{"input_ids": [5, 600]}\n', "token id 600 is outside the vocabulary"),
    ('{"prompt": "x"}\n', "exactly one of 'text' or 'input_ids'"),
    ("[1, 2]\n", "exactly one of"),
    ("not json\n", ":1: not a JSON object")])
def test_bad_calibration_file_leaves_nothing(content, msg, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(content)
    with pytest.raises(UserError, match=msg):
        quantize(FIX / "source", tmp_path / "out", "nvfp4", calib=str(f), num_samples=2, seq_len=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_text_calibration_without_tokenizer_is_refused(tmp_path):
    f = jsonl(tmp_path / "t.jsonl", ["hello world"] * 2, "text")
    with pytest.raises(UserError, match="needs the checkpoint's tokenizer"):
        quantize(FIX / "source", tmp_path / "out", "nvfp4", calib=f, num_samples=2)
    assert not (tmp_path / "out").exists()


def test_already_quantized_source_refused(calib, tmp_path):
    for name, what in (("modelopt_nvfp4", "modelopt NVFP4"), ("llmc_nvfp4", "compressed-tensors NVFP4")):
        with pytest.raises(UserError, match=f"already quantized \\({what}\\).*convert --to fp8"):
            quantize(FIX / name, tmp_path / "out", "nvfp4", calib=calib, num_samples=4)
    src = tmp_path / "stripped"  # quantized tensors without any quantization config
    shutil.copytree(FIX / "modelopt_fp8", src)
    (src / "hf_quant_config.json").unlink()
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="already quantized \\(model.layers.0.mlp.down_proj is fp8\\)"):
        quantize(src, tmp_path / "out", "fp8", calib=calib, num_samples=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stripped"]


@pytest.mark.parametrize("layers, msg", [
    (3, "tensor 'model.layers.2.*' is missing"),
    (1, "tensor 'model.*1.* is not part of the model config.json describes \\(11 such")])
def test_layers_not_matching_config_refused(layers, msg, calib, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIX / "source", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=msg):
        quantize(src, tmp_path / "out", "nvfp4", calib=calib, num_samples=4, mode="streamed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_spill_disk_too_small_checked_up_front(calib, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(stream, "run_streamed", lambda *a: started.append(1))
    sizes = stream.spill_bytes(LoopConfig.from_file(FIX / "source"), "nvfp4", False, torch.bfloat16, calib_rows())
    assert sizes["activations"] == 2 * 512 * 64 * 2 and sizes["pass-1 K/V"] == 2 * 512 * 64 * 2
    monkeypatch.setattr(pipeline, "free_bytes", lambda p: sum(sizes.values()))  # output does not fit on top
    with pytest.raises(UserError, match="not enough disk space for quantize: needs .*spill activations"):
        quantize(FIX / "source", tmp_path / "out", "nvfp4", calib=calib, num_samples=16, seq_len=32, mode="streamed")
    assert not started and list(tmp_path.iterdir()) == []


def test_report_too_big_for_ram_refused_up_front(calib, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "available_ram", lambda: 1000)
    with pytest.raises(UserError, match="--report runs eval-quant with the fp32 reference model"):
        quantize(FIX / "source", tmp_path / "out", "nvfp4", calib=calib, num_samples=4, report=True)
    assert list(tmp_path.iterdir()) == []


def test_awq_refused_with_reason(calib, tmp_path):
    with pytest.raises(UserError, match="nvfp4_awq: not offered.*assert CUDA.*tensor_quant.py:172"):
        quantize(FIX / "source", tmp_path / "out", "nvfp4_awq", calib=calib)


def test_report_validate_and_every_runtime_mode(tiny, tmp_path):
    from trtllm_loop.conformance import compute
    out = tmp_path / "q"
    rep = quantize(tiny, out, "nvfp4", "fp8", "builtin", num_samples=4, seq_len=32, report=True, report_samples=2)
    r = json.loads((out / pipeline.REPORT).read_text())
    assert r["held_out_samples"] == 2 and r["emulate_activations"] == "nvfp4" and r["summary"] == rep["report"]
    assert r["summary"]["positions"] == 64 and len(r["sequences"]) == 2
    pp = r["sequences"][0]["per_position"]
    assert len(pp["kl"]) == len(pp["top1"]) == len(pp["max_abs_dlogit"]) == 32
    assert 0 < r["summary"]["kl_mean"] < 1 and 0.3 < r["summary"]["top1_agreement"] <= 1
    assert validate(out) == []
    ids = [5, 9, 33, 70, 2, 11, 200, 17, 4]
    ref, = compute(str(out), [ids], "prefill")
    w4a4, = compute(str(out), [ids], "prefill", emulate_activations="nvfp4")
    for mode in ("decode", "paged", "torch-backend"):  # TRT-LLM's NVFP4 linear quantizes activations (W4A4)
        got, = compute(str(out), [ids], mode)
        want = w4a4 if mode == "torch-backend" else ref
        assert got.shape == (9, 512) and float(np.abs(got - want).max()) <= 1e-4, mode
    assert float(np.abs(w4a4 - ref).max()) > 1e-2


def test_cli(calib, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(FIX / "source"), str(out), "--qformat", "w4a16_nvfp4", "--calib", calib,
                 "--num-samples", "16", "--seq-len", "32"]) == 0
    assert "W4A16_NVFP4, kv cache none, memory mode, 16 samples / 512 tokens" in capsys.readouterr().out
    assert main(["quantize", str(FIX / "source"), str(out), "--qformat", "fp8", "--calib", calib]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(FIX / "source"), str(out), "--qformat", "fp8", "--num-samples", "0"])
    assert e.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


def test_auto_mode_streams_when_the_model_does_not_fit(calib, tmp_path, monkeypatch):
    cfg = LoopConfig.from_file(FIX / "source")
    need = pipeline.memory_bytes(cfg, torch.bfloat16, calib_rows())
    assert need > cfg.num_parameters() * 2
    monkeypatch.setattr(pipeline, "available_ram", lambda: need - 1)
    assert quantize(FIX / "source", tmp_path / "a", "nvfp4", calib=calib, num_samples=16, seq_len=32)["mode"] == \
        "streamed"
    monkeypatch.setattr(pipeline, "available_ram", lambda: need)
    assert quantize(FIX / "source", tmp_path / "b", "nvfp4", calib=calib, num_samples=16, seq_len=32)["mode"] == \
        "memory"
