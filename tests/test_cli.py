"""The command line: synth, inspect, logits, generate, demo, and error handling."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import GOLDEN_CASES, golden
from trtllm_loop.cli import main


def cli(*args):
    return main([str(a) for a in args])


def test_help_teaches_every_command(capsys):
    with pytest.raises(SystemExit):
        cli("--help")
    text = capsys.readouterr().out
    for cmd in ("synth", "inspect", "logits", "generate", "demo"):
        assert cmd in text
    with pytest.raises(SystemExit):
        cli("logits", "--help")
    assert "teacher-forced" in capsys.readouterr().out


def test_synth_presets_and_atomic_refusal(tmp_path, capsys):
    assert cli("synth", tmp_path / "t", "--preset", "tiny", "--seed", "1", "--dtype", "float32",
               "--no-tokenizer") == 0
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["model_type"] == "iquestloopcoder" and cfg["loop_window_size"] == 16
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "t" / "model.safetensors"))
    assert (sd["model.gate_projections.0.bias"] == 2.0).all()  # released gate bias
    assert len(sd) == 2 + 11 * 2 + 1
    # the same seed gives the same bytes
    assert cli("synth", tmp_path / "t2", "--preset", "tiny", "--seed", "1", "--dtype", "float32",
               "--no-tokenizer") == 0
    assert (tmp_path / "t" / "model.safetensors").read_bytes() == (tmp_path / "t2" / "model.safetensors").read_bytes()
    assert cli("synth", tmp_path / "t", "--preset", "tiny") == 2
    assert "already exists" in capsys.readouterr().err
    assert cli("synth", tmp_path / "s", "--preset", "small", "--no-tokenizer") == 0
    idx = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left


def test_inspect_40b_shape(tmp_path, capsys):
    assert cli("synth", tmp_path / "b", "--preset", "40b-shape") == 0
    assert not list((tmp_path / "b").glob("*.safetensors"))  # config + index only
    capsys.readouterr()
    assert cli("inspect", tmp_path / "b", "--gpu", "b200", "--max-seq-len", "32768", "--json") == 0
    r = json.loads(capsys.readouterr().out)
    assert r["parameters"] == 39_794_696_320
    assert r["weight_bytes"] == 79_589_392_640  # bf16 bytes from the architecture doc
    assert r["kv_bytes_per_token"] == {"pass1_full": 327_680, "pass2_window": 327_680}
    budget = 180e9 * 0.9 - 79_589_392_640 - 4e9
    assert r["gpu"]["max_tokens_in_pass1_cache"] == int(budget // 327_680)
    assert r["gpu"]["max_sequences_at_max_len"] == int(budget // (327_680 * 32768 + 327_680 * 64))
    assert r["architecture"]["kv_slots"] == 160 and r["architecture"]["window_pattern"] == [32768, 64]
    assert cli("inspect", tmp_path / "b", "--gpu", "h100") == 0
    assert "do not fit" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["prefill", "decode", "paged"])
def test_logits_cli_writes_npy_and_directories(tmp_path, mode):
    d, ids, expected = golden(GOLDEN_CASES[0])
    (tmp_path / "a.json").write_text(json.dumps(ids))
    (tmp_path / "b.json").write_text(json.dumps(ids[:9]))
    assert cli("logits", d, "--ids", tmp_path / "a.json", "--mode", mode, "--out", tmp_path / "one.npy",
               "--chunk", 5, "--tokens-per-block", 4) == 0
    got = np.load(tmp_path / "one.npy")
    assert got.dtype == np.float32 and np.abs(got - expected).max() < 1e-4
    assert cli("logits", d, "--ids", tmp_path / "a.json", "--ids", tmp_path / "b.json", "--mode", mode,
               "--out", tmp_path / "many", "--chunk", 5, "--tokens-per-block", 4, "--prefill-len", 6) == 0
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == [".trtllm-loop-output", "0.npy", "1.npy"]
    assert np.abs(np.load(tmp_path / "many" / "1.npy") - expected[:9]).max() < 1e-4


def test_logits_cli_errors(tmp_path, capsys):
    d, ids, _ = golden(GOLDEN_CASES[0])
    (tmp_path / "bad.json").write_text("[1, 2, 100000]")
    assert cli("logits", d, "--ids", tmp_path / "bad.json", "--out", tmp_path / "x.npy") == 2
    assert "token id 100000 is outside the vocabulary [0, 128)" in capsys.readouterr().err
    (tmp_path / "notjson.json").write_text("[1, 2,")
    assert cli("logits", d, "--ids", tmp_path / "notjson.json", "--out", tmp_path / "x.npy") == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert cli("logits", tmp_path, "--ids", tmp_path / "bad.json", "--out", tmp_path / "x.npy") == 2
    assert "config.json: not found" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_missing_gate_tensor_is_named(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    d, ids, _ = golden(GOLDEN_CASES[0])
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.gate_projections.1.bias"]
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "a.json").write_text(json.dumps(ids))
    assert cli("logits", tmp_path, "--ids", tmp_path / "a.json", "--out", tmp_path / "x.npy") == 2
    err = capsys.readouterr().err
    assert "'model.gate_projections.1.bias' is missing" in err and "re-export" in err


def test_generate_cli_streams_and_json(tiny_ckpt, capsys):
    assert cli("generate", tiny_ckpt, "--prompt-ids", "5,6,7", "--max-tokens", 5, "--ignore-eos", "--json") == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["prompt_ids"] == [5, 6, 7] and len(rec["output_ids"]) == 5 and rec["finish_reason"] == "length"
    assert cli("generate", tiny_ckpt, "--prompt-ids", "5,6,7", "--max-tokens", 5, "--ignore-eos") == 0
    out = capsys.readouterr().out
    assert " ".join(map(str, rec["output_ids"])) in out and "[length, 5 tokens]" in out
    assert cli("generate", tiny_ckpt, "--prompt-ids", "5,6,7", "--top-p", "0") == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_demo_runs_as_a_console_script(tmp_path):
    exe = [sys.executable, "-m", "trtllm_loop.cli"]
    r = subprocess.run(exe + ["demo", "--no-server", "--workdir", str(tmp_path), "--max-tokens", "6"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "demo passed" in r.stdout


def test_logits_emulate_activations_on_a_real_nvfp4_export(tmp_path, capsys):
    """W4A4 emulation: the same numbers in every reference mode, different from weight-only dequantization,
    and refused where the checkpoint has no activation scales."""
    from conftest import REPO

    fx = REPO / "tests" / "fixtures" / "nvfp4"
    d, ids, _ = golden("s1_gqa4x2_w8_T29")  # the fixtures were exported from this case
    (tmp_path / "a.json").write_text(json.dumps(ids))
    outs = {}
    for mode in ("prefill", "decode", "paged"):
        assert cli("logits", fx / "modelopt_nvfp4", "--ids", tmp_path / "a.json", "--mode", mode,
                   "--emulate-activations", "nvfp4", "--out", tmp_path / f"{mode}.npy") == 0
        outs[mode] = np.load(tmp_path / f"{mode}.npy")
    assert np.abs(outs["prefill"] - outs["decode"]).max() < 1e-4
    assert np.abs(outs["prefill"] - outs["paged"]).max() < 1e-4
    assert cli("logits", fx / "modelopt_nvfp4", "--ids", tmp_path / "a.json", "--out", tmp_path / "w.npy") == 0
    assert np.abs(np.load(tmp_path / "w.npy") - outs["prefill"]).max() > 1e-3
    capsys.readouterr()
    assert cli("logits", fx / "modelopt_w4a16_nvfp4", "--ids", tmp_path / "a.json", "--emulate-activations",
               "nvfp4", "--out", tmp_path / "x.npy") == 2
    assert "needs the static activation scales (input_scale)" in capsys.readouterr().err


def test_generate_text_stream_equals_final_text(tmp_path, capsys):
    assert cli("synth", tmp_path / "m", "--preset", "tiny", "--dtype", "float32") == 0
    assert (tmp_path / "m" / "tokenizer.model").is_file()
    args = ["generate", tmp_path / "m", "--prompt", "héllo wörld 你好 ", "--max-tokens", 24, "--ignore-eos"]
    assert cli(*args, "--json") == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]
    assert cli(*args) == 0
    streamed = capsys.readouterr().out.rsplit("\n[length, 24 tokens]", 1)[0]
    assert streamed == final
