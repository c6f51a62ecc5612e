"""The TensorRT-LLM 1.2.x engine-flow model definition (``trtllm_loop/trtllm/engine``) on the API double:
``logits --mode engine`` against the golden logits and the NumPy oracle (single, batched, chunked, TP 2/4 from
``convert --to trtllm-ckpt`` shards), the gate plugin layer, the runtime's window vector, and the double's
refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import GOLDEN_CASES, golden
from loopref import forward
from test_torch_backend import _case  # the oracle cases of the PyTorch backend's tests
from trtllm_loop.cli import main
from trtllm_loop.conformance import compute
from trtllm_loop.errors import UserError
from trtllm_loop.trtllm.compat import ensure_tensorrt_llm

TOL = 1e-4
_, IS_DOUBLE = ensure_tensorrt_llm()
pytestmark = pytest.mark.skipif(not IS_DOUBLE, reason="the engine flow runs eagerly on the API double in CI")
SCHEDULES = [dict(chunk=256, tokens_per_block=16), dict(chunk=5, tokens_per_block=4),
             dict(chunk=3, tokens_per_block=3, prefill_len=7)]
def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_single_batched_and_chunked(name):
    d, ids, expected = golden(name)
    [one] = compute(str(d), [ids], "engine")
    assert one.shape == expected.shape and one.dtype == np.float32 and maxdiff(one, expected) < TOL
    seqs = [ids, ids[:8], ids[:1], ids[:-2]]  # by causality expected[:n] are the prefix's logits
    for sched in SCHEDULES:
        for s, got in zip(seqs, compute(str(d), seqs, "engine", **sched)):
            assert maxdiff(got, expected[:len(s)]) < TOL, (name, sched, len(s))


@pytest.mark.parametrize("name", ["h8_kv4_w5", "mqa_w4"])
def test_new_cases_and_tensor_parallel_shards(name, tmp_path_factory, tmp_path):
    """TP 2 and 4 (MQA: the one KV head replicated on every rank) from `convert --to trtllm-ckpt --tp N` shards
    equal TP 1 and the oracle."""
    d, conf, w, seqs, expected = _case(name, tmp_path_factory)
    one = compute(str(d), seqs, "engine", chunk=4, tokens_per_block=4, prefill_len=9)
    for got, exp in zip(one, expected):
        assert maxdiff(got, exp) < TOL
    assert maxdiff(forward(conf, w, seqs[0], gate_pre_rope=True), expected[0]) > 100 * TOL  # the case is sensitive
    for tp in (2, 4):
        assert main(["convert", str(d), str(tmp_path / f"tp{tp}"), "--to", "trtllm-ckpt", "--tp", str(tp)]) == 0
        assert sorted(p.name for p in (tmp_path / f"tp{tp}").glob("rank*.safetensors")) == \
            [f"rank{r}.safetensors" for r in range(tp)]
        many = compute(str(tmp_path / f"tp{tp}"), seqs, "engine", chunk=4, tokens_per_block=4, prefill_len=9)
        for a, b, exp in zip(one, many, expected):
            assert maxdiff(b, exp) < TOL and maxdiff(a, b) < 2e-5  # only the all-reduce's summation order differs


def test_cli_logits_engine_tp2_and_gate_plugin(tmp_path):
    d, ids, expected = golden(GOLDEN_CASES[0])
    (tmp_path / "a.json").write_text(json.dumps(ids))
    (tmp_path / "b.json").write_text(json.dumps(ids[:5]))
    args = ["logits", str(d), "--ids", str(tmp_path / "a.json"), "--ids", str(tmp_path / "b.json"), "--mode",
            "engine", "--chunk", "6", "--tokens-per-block", "4"]
    assert main(args + ["--tp", "2", "--gate-plugin", "--out", str(tmp_path / "out")]) == 0
    assert maxdiff(np.load(tmp_path / "out" / "0.npy"), expected) < TOL
    assert maxdiff(np.load(tmp_path / "out" / "1.npy"), expected[:5]) < TOL


def test_the_gate_plugin_layer_runs_once_per_block_and_equals_the_functional_gate(monkeypatch):
    from trtllm_loop.kernels import gate_mix
    from trtllm_loop.trtllm.engine import gate_plugin

    d, ids, expected = golden(GOLDEN_CASES[0])
    calls = []

    def spy(q, positions, g, loc, w, b, theta):
        calls.append((tuple(q.shape), positions.dtype, theta))
        return gate_mix.gate_mix_reference(q, positions, g, loc, w, b, theta)

    monkeypatch.setattr(gate_plugin, "gate_mix_reference", spy)
    seqs = [ids, ids[:7]]
    plain = compute(str(d), seqs, "engine", chunk=8, tokens_per_block=4)
    assert calls == []
    fused = compute(str(d), seqs, "engine", chunk=8, tokens_per_block=4, gate_plugin=True)
    layers = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    steps = 4  # 29 and 7 tokens in chunks of 8: 4 steps
    assert len(calls) == layers * steps and all(c[1] == torch.int32 for c in calls)
    for a, b in zip(plain, fused):
        assert maxdiff(a, b) < 1e-6
    assert maxdiff(fused[0], expected) < TOL


def test_an_unregistered_gate_plugin_is_refused_with_the_fix():
    import tensorrt as trt

    from trtllm_loop.kernels.gate_mix import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
    from trtllm_loop.trtllm.engine import gate_plugin

    reg = trt.get_plugin_registry()
    gate_plugin.load_gate_plugin()
    reg.deregister_creator(reg.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE))
    try:
        with pytest.raises(UserError, match="IQuestLoopGateMix v1 is not registered: load the loop gate"):
            gate_plugin.gate_mix_plugin(*[None] * 6, num_heads=4, head_dim=16, rope_theta=1.0)
    finally:
        gate_plugin.load_gate_plugin()
    assert reg.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None
    gate_plugin.load_gate_plugin()  # idempotent: one creator
    assert sum(c.name == PLUGIN_NAME for c in reg.all_creators) == 1


def test_the_window_comes_from_the_runtime_vector(tmp_path):
    """The model passes no window: the local KV layers attend within ``host_max_attention_window_sizes`` that
    the runtime builds from ``max_attention_window``. A runtime that leaves the window out (every layer full)
    gets the wrong logits past W tokens -- and the right ones within W."""
    from tensorrt_llm.models.modeling_utils import PretrainedConfig

    from trtllm_loop.trtllm.engine.checkpoint import convert_trtllm
    from trtllm_loop.trtllm.engine.model import IQuestLoopEngineForCausalLM
    from trtllm_loop.trtllm.engine.runner import _plugin_config, score

    d, ids, expected = golden(GOLDEN_CASES[0])
    convert_trtllm(d, tmp_path / "ck")
    config = PretrainedConfig.from_json_file(str(tmp_path / "ck" / "config.json"))
    model = IQuestLoopEngineForCausalLM.from_checkpoint(str(tmp_path / "ck"), rank=0, config=config)
    W = model.loop_cfg.loop_window_size
    kw = dict(tokens_per_block=4, chunk=8, prefill_len=None, max_seq_len=len(ids))
    [good] = score([model], _plugin_config("float32", 4), [ids], window=W, **kw)
    [full] = score([model], _plugin_config("float32", 4), [ids], window=len(ids), **kw)
    assert maxdiff(good, expected) < TOL
    assert maxdiff(full[:W], expected[:W]) < TOL and maxdiff(full[W:], expected[W:]) > 100 * TOL


def test_the_double_refuses_what_the_real_engine_flow_refuses(tmp_path):
    from tensorrt_llm._common import Network, net_guard
    from tensorrt_llm.functional import constant, gpt_attention
    from tensorrt_llm.models.modeling_utils import PretrainedConfig

    from trtllm_loop.trtllm.engine.checkpoint import convert_trtllm
    from trtllm_loop.trtllm.engine.model import IQuestLoopEngineForCausalLM
    from trtllm_loop.trtllm.engine.runner import _plugin_config

    t = constant(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError):
        t[0]  # network tensors have no indexing ...
    with pytest.raises(TypeError):
        torch.cat([t, t])  # ... and are not torch tensors
    with pytest.raises(AttributeError):
        t.unflatten(-1, (3, 1))
    with net_guard(Network(_plugin_config("float32", 4))):
        with pytest.raises(AssertionError):  # functional.py gpt_attention: host_request_types is required
            gpt_attention(qkv=t, past_key_value=None, sequence_length=t, host_past_key_value_lengths=t,
                          host_max_attention_window_sizes=t, host_sink_token_length=t, context_lengths=t,
                          cache_indirection=t, host_request_types=None, layer_idx=0, num_heads=1, num_kv_heads=1,
                          hidden_size_per_head=1, q_scaling=1.0, max_context_length=4, host_context_lengths=t)
    d, ids, _ = golden(GOLDEN_CASES[0])
    convert_trtllm(d, tmp_path / "ck")
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "ck" / "rank0.safetensors"))
    del sd["transformer.gate_projections.1.bias"]
    save_file(sd, str(tmp_path / "ck" / "rank0.safetensors"))
    config = PretrainedConfig.from_json_file(str(tmp_path / "ck" / "config.json"))
    with pytest.raises(RuntimeError, match="Required but not provided tensors.*gate_projections.1.bias"):
        IQuestLoopEngineForCausalLM.from_checkpoint(str(tmp_path / "ck"), rank=0, config=config)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["num_hidden_layers"] = cfg["num_unique_layers"]  # an 80-KV-layer config: pass 2 would have no slots
    with pytest.raises(UserError, match="num_hidden_layers 2 must be 2 \\* num_unique_layers"):
        IQuestLoopEngineForCausalLM(PretrainedConfig.from_dict(cfg))
