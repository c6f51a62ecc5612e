"""`trtllm-loop verify` end to end on the API double: synthesize, deploy, LLM API, prefill + decode, report."""
from __future__ import annotations

import json

import pytest

from trtllm_loop.cli import main
from trtllm_loop.errors import UserError
from trtllm_loop.trtllm.verify import verify


def test_cli_verify_json_report_decodes_past_the_window_edge(tmp_path, capsys):
    rc = main(["verify", "--backend", "pytorch", "--work", str(tmp_path / "w"), "--json", str(tmp_path / "R.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "verify: PASS" in out and "API double, float32" in out
    report = json.loads((tmp_path / "R.json").read_text())
    assert report == json.loads((tmp_path / "w" / "report.json").read_text())
    assert report["passed"] and report["window"] == 16 and report["decode_steps"] == 24  # W + 8
    assert report["versions"]["api_double"] is True and report["versions"]["torch"]
    assert report["phases"]["decode"]["window_edge_positions"] == [15, 16, 17]
    assert report["phases"]["prefill"]["max_abs"] < 1e-4 and report["phases"]["decode"]["max_abs"] < 1e-4
    # CUDA graphs on (batch 1, batch 2) and off (batch 2); the short prompt (W - 4) and the long one batched
    assert [(r["cuda_graphs"], r["batch"]) for r in report["runs"]] == [(True, [12]), (True, [12, 533]),
                                                                       (False, [12, 533])]
    # TRT-LLM's chunk unit with a sliding window is 256 tokens: the long prompt prefills as 256 + 256 + 21
    assert report["chunk_unit"] == 256 and report["max_num_tokens"] == 256
    long = report["runs"][1]["requests"][1]
    assert long["planned_chunks"] == long["scheduled_chunks"] == [256, 256, 21]
    assert all(r["decode"]["positions"][0] == r["length"] - 1 and len(r["decode"]["per_step"]) == 24
               for run in report["runs"] for r in run["requests"])
    # the double counts generation-only steps a CUDA graph would replay: none with graphs off
    assert report["runs"][0]["graph_eligible_steps"] == 23 and report["runs"][2]["graph_eligible_steps"] == 0


def test_verify_leaves_the_callers_environment_as_it_was(monkeypatch, tmp_path):
    # the MPI workers' PYTHONPATH / pool shares are set for the run only (a later Triton test in the same
    # process once found verify's deploy dir first on PYTHONPATH and no Triton templates)
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.delenv("TRTLLM_WINDOW_SIZE_SHARES", raising=False)
    assert verify(work=str(tmp_path / "w"), log=lambda _: None)["passed"]
    import os
    assert os.environ["PYTHONPATH"] == "/somewhere/else" and "TRTLLM_WINDOW_SIZE_SHARES" not in os.environ


def test_verify_tp2_from_a_target_config():
    lines = []
    report = verify(tp=2, config="build_configs/gb10.yaml", log=lines.append)
    assert report["passed"] and report["tp"] == 2 and "TP 2" in lines[0]


def test_verify_detects_a_wrong_mix(monkeypatch, capsys):
    from trtllm_loop.trtllm.torch_backend import modeling_iquest_loop as m

    # a TRT-LLM-side fault (the shared schedule is not touched, so the reference stays right): the gate of
    # every layer inverted, i.e. (1 - g) * global + g * local, with the plain torch ops and with the fused gate op
    gate, fused = m.TrtllmGateProjection.forward, m.TrtllmFusedGateBackend.gated_mix
    monkeypatch.setattr(m.TrtllmGateProjection, "forward", lambda self, q_rot: 1 - gate(self, q_rot))
    monkeypatch.setattr(m.TrtllmFusedGateBackend, "gated_mix", lambda self, gp, q, g, l: fused(self, gp, q, l, g))
    assert main(["verify"]) == 1
    assert "verify: FAIL" in capsys.readouterr().out


def test_verify_detects_a_decode_only_fault(monkeypatch):
    """A fault only in generation steps (the local window shifted by one at decode) fails the decode phase
    while prefill passes."""
    from tensorrt_llm._torch.attention_backend import trtllm as att

    forward = att.TrtllmAttention.forward

    def shifted(self, q, k, v, metadata, *a, attention_window_size=None, **kw):
        if attention_window_size is not None and metadata.num_contexts == 0:
            attention_window_size += 1
        return forward(self, q, k, v, metadata, *a, attention_window_size=attention_window_size, **kw)

    monkeypatch.setattr(att.TrtllmAttention, "forward", shifted)
    report = verify(log=lambda s: None)
    assert not report["passed"]
    assert report["phases"]["prefill"]["passed"] and not report["phases"]["decode"]["passed"]


def test_verify_falls_back_to_topk_logprobs(monkeypatch):
    """Where the API returns no context logits, top-k prompt log-probs are compared instead."""
    from tensorrt_llm.llmapi import llm as api

    original = api.LLM.generate

    def no_context_logits(self, inputs, sampling_params=None, **kw):
        outs = original(self, inputs, sampling_params, **kw)
        for o in outs:
            o.context_logits = None
        return outs

    monkeypatch.setattr(api.LLM, "generate", no_context_logits)
    report = verify(log=lambda s: None)
    assert report["passed"]
    reqs = [r for run in report["runs"] for r in run["requests"]]
    assert all(r["prefill"]["top1_agree"] is None and len(r["prefill"]["per_position"]) == r["length"] for r in reqs)


def test_verify_gpu_needs_trtllm_and_a_gpu():
    with pytest.raises(UserError, match="needs TensorRT-LLM 1.2.1 importable"):
        verify(gpu=True)


def test_verify_json_directory_must_exist(tmp_path):
    with pytest.raises(UserError, match="--json .*its directory does not exist"):
        verify(json_out=str(tmp_path / "no" / "R.json"))


def test_verify_gpu_geometry_on_the_double(tmp_path):
    """The model --gpu deploys (head_dim 128, W 64): short prompt 60, long 2 x 256 + 69; decode 72 steps."""
    report = verify(model="gpu", work=str(tmp_path), log=lambda s: None)
    assert report["passed"] and report["model"] == "gpu"
    assert report["runs"][1]["batch"] == [60, 581] and report["decode_steps"] == 72
    assert report["phases"]["decode"]["window_edge_positions"] == [63, 64, 65]
    with pytest.raises(UserError, match="--model 'huge'"):
        verify(model="huge")
