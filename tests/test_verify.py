"""`trtllm-loop verify` end to end on the API double: synthesize, deploy, LLM API, compare, report."""
from __future__ import annotations

import json

import pytest

from trtllm_loop.cli import main
from trtllm_loop.errors import UserError
from trtllm_loop.trtllm.verify import verify


def test_cli_verify_passes_and_reports_every_position(tmp_path, capsys):
    rc = main(["verify", "--backend", "pytorch", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "verify: PASS" in out and "API double, float32" in out
    report = json.loads((tmp_path / "report.json").read_text())
    lengths = [p["length"] for p in report["prompts"]]
    assert lengths == [18, 53, 32]  # tiny preset W = 16: past W, past 3W, exactly 2W
    assert sum(line.strip().startswith("pos ") for line in out.splitlines()) == sum(lengths)
    assert out.count("<- window edge") == 9
    assert all(p["max_abs"] < 1e-4 and p["top1_agree"] == 1.0 for p in report["prompts"])
    assert (tmp_path / "deploy" / "serve.sh").is_file()


def test_verify_tp2_from_a_target_config():
    lines = []
    report = verify(tp=2, config="build_configs/gb10.yaml", log=lines.append)
    assert report["passed"] and report["tp"] == 2 and "TP 2" in lines[0]


def test_verify_detects_a_wrong_mix(monkeypatch, capsys):
    from trtllm_loop.trtllm.torch_backend import modeling_iquest_loop as m

    # a TRT-LLM-side fault (the shared schedule is not touched, so the reference stays right): the gate of
    # every layer inverted, i.e. (1 - g) * global + g * local
    gate = m.TrtllmGateProjection.forward
    monkeypatch.setattr(m.TrtllmGateProjection, "forward", lambda self, q_rot: 1 - gate(self, q_rot))
    assert main(["verify"]) == 1
    assert "verify: FAIL" in capsys.readouterr().out


def test_verify_falls_back_to_topk_logprobs(monkeypatch):
    """Where the API returns no context logits, top-k prompt log-probs are compared instead."""
    from tensorrt_llm.llmapi import llm as api

    original = api.LLM.generate

    def no_context_logits(self, inputs, sampling_params=None):
        outs = original(self, inputs, sampling_params)
        for o in outs:
            o.context_logits = None
        return outs

    monkeypatch.setattr(api.LLM, "generate", no_context_logits)
    report = verify(log=lambda s: None)
    assert report["passed"] and all(p["top1_agree"] is None for p in report["prompts"])
    assert all(len(p["per_position"]) == p["length"] for p in report["prompts"])


def test_verify_gpu_needs_trtllm_and_a_gpu():
    with pytest.raises(UserError, match="needs TensorRT-LLM 1.2.1 importable"):
        verify(gpu=True)


def test_verify_gpu_geometry_on_the_double(tmp_path):
    """The model --gpu deploys (head_dim 128, W 64: prompts of 66, 197 and 128 tokens) runs the same flow."""
    report = verify(model="gpu", work=str(tmp_path), log=lambda s: None)
    assert report["passed"] and report["model"] == "gpu"
    assert [p["length"] for p in report["prompts"]] == [66, 197, 128]
    with pytest.raises(UserError, match="--model 'huge'"):
        verify(model="huge")
