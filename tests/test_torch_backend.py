"""The TensorRT-LLM PyTorch-backend adapter, executed on the API double (`trtllm-loop logits --mode torch-backend`).

Expected logits never come from the code under test: the shared golden files, the float64 NumPy oracle
(`tests/loopref.py`, written from the spec) and, for NVFP4 checkpoints, the reference model with the
checkpoint's dequantized weights (and W4A4 activation emulation)."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import GOLDEN_CASES, golden, make_checkpoint, unequal_fused_scales
from loopref import forward
from trtllm_loop.cli import main
from trtllm_loop.conformance import compute
from trtllm_loop.errors import UserError
from trtllm_loop.trtllm.compat import ensure_tensorrt_llm
from trtllm_loop.kernels.gate_mix import op_available
from trtllm_loop.trtllm.torch_backend import run_logits
from trtllm_loop.trtllm.torch_backend.modeling_iquest_loop import FUSED_GATE_ENV

TOL = 1e-4
FIX = "tests/fixtures/nvfp4"
tllm, IS_DOUBLE = ensure_tensorrt_llm()
pytestmark = pytest.mark.skipif(not IS_DOUBLE, reason="CPU tests of the adapter run on the API double")

SCHEDULES = [dict(chunk=256, tokens_per_block=16),                    # whole prompt in one context step
             dict(chunk=5, tokens_per_block=4),                       # chunked context, blocks cross the window
             dict(chunk=3, tokens_per_block=3, prefill_len=7)]        # then teacher-forced decode steps


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_batched_and_chunked(name):
    d, ids, expected = golden(name)
    seqs = [ids, ids[:8], ids[:1], ids[:-2]]  # by causality expected[:n] are the prefix's logits
    for sched in SCHEDULES:
        outs = compute(str(d), seqs, "torch-backend", **sched)
        for s, got in zip(seqs, outs):
            assert got.shape == (len(s), expected.shape[1]) and got.dtype == np.float32
            assert maxdiff(got, expected[:len(s)]) < TOL, (name, sched, len(s))


# new golden-like cases: shapes whose heads split over 2 and 4 ranks, MQA, tied embeddings, window > length
CASES = {
    "h8_kv4_w5": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, hidden_size=64, loop_window_size=5),
    "h8_kv4_tied_w3_vocab_odd": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=6, hidden_size=40,
                                     loop_window_size=3, tie_word_embeddings=True, vocab_size=99),
    "mqa_w4": dict(num_key_value_heads=1, loop_window_size=4),
    "window_longer_than_seq": dict(loop_window_size=200, num_hidden_layers=3),
}


_BUILT: dict = {}


def _case(name, tmp_path_factory):
    """Checkpoint + prompts + oracle logits of a case, built once per session."""
    if name not in _BUILT:
        d, conf, w = make_checkpoint(tmp_path_factory.mktemp(name), seed=zlib.crc32(name.encode()) % 997,
                                     **CASES[name])
        rng = np.random.default_rng(len(name))
        seqs = [rng.integers(0, conf["vocab_size"], n).tolist() for n in (31, 12, 2)]
        _BUILT[name] = (d, conf, w, seqs, [forward(conf, w, s) for s in seqs])
    return _BUILT[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_new_cases_single_and_batched(name, tmp_path_factory):
    d, conf, w, seqs, expected = _case(name, tmp_path_factory)
    [got] = run_logits(d, seqs[:1], chunk=7, tokens_per_block=4)
    assert maxdiff(got, expected[0]) < TOL
    outs = run_logits(d, seqs, chunk=4, tokens_per_block=4, prefill_len=9)
    for got, exp in zip(outs, expected):
        assert maxdiff(got, exp) < TOL
    # the case is sensitive: the oracle's bug knobs move it far beyond the tolerance
    assert maxdiff(forward(conf, w, seqs[0], gate_pre_rope=True), expected[0]) > 100 * TOL
    assert maxdiff(forward(conf, w, seqs[0], global_from_loop1=True), expected[0]) > 100 * TOL


@pytest.mark.parametrize("name,tp", [(n, tp) for n in sorted(CASES) for tp in (2, 4)])
def test_tensor_parallel_ranks_equal_tp1_and_oracle(name, tp, tmp_path_factory):
    """Simulated ranks (threads, summed all-reduce): heads and gate rows split over the ranks; KV heads split,
    or are replicated when there are more ranks than KV heads (MQA at TP 2/4, 4 KV heads at TP 4 ... )."""
    d, conf, _, seqs, expected = _case(name, tmp_path_factory)
    one = run_logits(d, seqs, chunk=5, tokens_per_block=4, prefill_len=11)
    many = run_logits(d, seqs, chunk=5, tokens_per_block=4, prefill_len=11, tp_size=tp)
    for a, b, exp in zip(one, many, expected):
        assert maxdiff(b, exp) < TOL
        assert maxdiff(a, b) < 2e-5  # only the all-reduce's summation order differs


def test_cli_logits_torch_backend_tp2(tmp_path, tmp_path_factory):
    d, conf, _, seqs, expected = _case("h8_kv4_w5", tmp_path_factory)
    files = []
    for i, s in enumerate(seqs):
        files += ["--ids", str(tmp_path / f"{i}.json")]
        (tmp_path / f"{i}.json").write_text(json.dumps(s))
    rc = main(["logits", str(d), *files, "--mode", "torch-backend", "--tp", "2", "--chunk", "6",
               "--tokens-per-block", "4", "--out", str(tmp_path / "out")])
    assert rc == 0
    for i, exp in enumerate(expected):
        assert maxdiff(np.load(tmp_path / "out" / f"{i}.npy"), exp) < TOL


@pytest.mark.parametrize("gate_bias,override,window", [(-40.0, 0.0, 64), (40.0, 1.0, 4)])
def test_local_window_and_global_branch_in_isolation(tmp_path, gate_bias, override, window):
    """Gate forced to 0: pass 2 = local attention over exactly W = 64 keys including the current token (the
    window crosses block and chunk edges). Gate forced to 1: pass 2 = global attention over the pass-1 K/V
    re-appended into the same KV layer."""
    d, conf, w = make_checkpoint(tmp_path, seed=7, gate_bias=gate_bias, gate_weight_zero=True,
                                 loop_window_size=window)
    ids = np.random.default_rng(2).integers(0, conf["vocab_size"], 90).tolist()
    exact = forward(conf, w, ids, gate_override=override)
    [got] = run_logits(d, [ids], chunk=13, tokens_per_block=8, prefill_len=70)
    assert maxdiff(got, exact) < TOL
    if override == 0.0:
        for off_by_one in (63, 65):
            assert maxdiff(forward(conf, w, ids, window=off_by_one, gate_override=0.0)[64:], exact[64:]) > 100 * TOL
    else:
        assert maxdiff(forward(conf, w, ids, global_from_loop1=True, gate_override=1.0), exact) > 100 * TOL


# ------------------------------------------------------------------------------------------ NVFP4 / FP8
def _reference(ckpt: str, ids: list[int], w4a4: bool) -> np.ndarray:
    from trtllm_loop.checkpoint import load_state_dict
    from trtllm_loop.modeling.load import load_model
    from trtllm_loop.modeling.emulate import emulate_nvfp4_activations

    model = load_model(ckpt, "float32")
    _, scales = load_state_dict(ckpt, torch.float32, return_input_scales=True)
    hooks = emulate_nvfp4_activations(model, scales) if w4a4 else []
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0].float().numpy()
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("name,w4a4", [("modelopt_nvfp4", True), ("modelopt_nvfp4_fp8kv", True),
                                       ("modelopt_fp8", False)])
def test_quantized_checkpoints_load_through_the_linear_methods(name, w4a4):
    ckpt = f"{FIX}/{name}"
    ids = json.loads(open(f"{FIX}/source/input_ids.json").read())
    expected = _reference(ckpt, ids, w4a4)
    outs = run_logits(ckpt, [ids, ids[:9]], chunk=6, tokens_per_block=4, prefill_len=20)
    assert maxdiff(outs[0], expected) < TOL and maxdiff(outs[1], expected[:9]) < TOL
    [tp2] = run_logits(ckpt, [ids], chunk=6, tokens_per_block=4, tp_size=2)
    assert maxdiff(tp2, expected) < TOL
    if w4a4:  # activation quantization matters: weight-only emulation is far off
        assert maxdiff(_reference(ckpt, ids, False), expected) > 100 * TOL


def test_unequal_fused_global_scales_are_rejected_like_trtllm(tmp_path):
    d = unequal_fused_scales(tmp_path)
    with pytest.raises(AssertionError, match="weight_scale_2 should be same"):
        run_logits(d, [[1, 2, 3]], chunk=4)


@pytest.mark.parametrize("name", ["modelopt_w4a16_nvfp4", "modelopt_nvfp4_awq"])
def test_quant_algos_trtllm_does_not_have_are_refused(name):
    with pytest.raises(UserError, match="not loadable by TensorRT-LLM 1.2.1"):
        run_logits(f"{FIX}/{name}", [[1, 2, 3]], chunk=4)


# ------------------------------------------------------------------------------------------ CUDA-graph safety
class _NoHostSync(TorchFunctionMode):
    """Fails, outside the (emulated) attention kernel, on any op that makes the host wait for the device, and on
    tensors created without an explicit device (on a GPU they are host tensors copied in: not capturable)."""
    SYNC = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
            torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.nonzero, torch.nonzero}
    HOST_ALLOC = {torch.tensor, torch.as_tensor, torch.arange, torch.zeros, torch.ones, torch.empty, torch.full,
                  torch.linspace}
    kernel_depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _NoHostSync.kernel_depth == 0:
            if func in self.SYNC:
                raise AssertionError(f"host sync inside forward: {getattr(func, '__name__', func)}")
            if func in self.HOST_ALLOC and "device" not in (kwargs or {}):
                raise AssertionError(f"host allocation inside forward: {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))


def test_forward_has_no_host_sync(monkeypatch):
    from tensorrt_llm._torch.attention_backend import trtllm as backend

    d, ids, expected = golden(GOLDEN_CASES[0])
    original = backend.TrtllmAttention.forward

    def kernel(self, *a, **k):  # the real op is one CUDA kernel; the double's emulator runs host code
        _NoHostSync.kernel_depth += 1
        try:
            return original(self, *a, **k)
        finally:
            _NoHostSync.kernel_depth -= 1

    monkeypatch.setattr(backend.TrtllmAttention, "forward", kernel)
    from trtllm_loop.trtllm.torch_backend import modeling_iquest_loop as m
    base = m.TrtllmLoopForCausalLM.forward

    def guarded(self, *a, **k):
        with _NoHostSync():
            return base(self, *a, **k)

    monkeypatch.setattr(m.TrtllmLoopForCausalLM, "forward", guarded)
    [got] = run_logits(d, [ids], chunk=8, tokens_per_block=4, prefill_len=20)
    assert maxdiff(got, expected) < TOL
    # the detector does fire
    with pytest.raises(AssertionError, match="host sync"):
        with _NoHostSync():
            torch.ones(1, device="cpu").item()
    with pytest.raises(AssertionError, match="host allocation"):
        with _NoHostSync():
            torch.arange(4)


def test_gate_rope_tables_match_an_independent_float64_rope():
    """The gate's device-resident RoPE tables (rotate-half layout, theta from config.json) against cos/sin computed
    here in float64 from the RoPE definition, also far beyond the golden lengths: the fp32 angle error grows with
    the position (ulp of pos * omega), so the tolerance does too; bf16 adds its rounding of values in [-1, 1]."""
    from tensorrt_llm._torch.model_config import ModelConfig

    from trtllm_loop.config import LoopConfig
    from trtllm_loop.trtllm.torch_backend.config_view import IQuestLoopTrtllmConfig, to_view_dict
    from trtllm_loop.trtllm.torch_backend.modeling_iquest_loop import TrtllmLoopForCausalLM

    d, _, _ = golden("s1_gqa4x2_w8_T29")
    cfg = LoopConfig.from_file(d)
    model = TrtllmLoopForCausalLM(ModelConfig(pretrained_config=IQuestLoopTrtllmConfig(**to_view_dict(cfg))))
    pos = np.array([0, 1, 5, 17, 4095, 131071])
    D = cfg.head_dim
    omega = cfg.rope_theta ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    ang = pos[:, None] * omega[None, :]
    want_cos, want_sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    angle_err = (pos[:, None] * 2.0 ** -23 * 4 + 1e-6)  # a few fp32 ulps of the angle, per row
    for dt, value_err in ((torch.float32, 1e-6), (torch.bfloat16, 2.0 ** -8)):
        cos, sin = model.model.rope_tables(torch.from_numpy(pos)[None], dt)
        assert cos.dtype == sin.dtype == dt and tuple(cos.shape) == (len(pos), D)
        for got, want in ((cos, want_cos), (sin, want_sin)):
            err = np.abs(got.double().numpy() - want)
            assert (err <= angle_err + value_err).all(), float(err.max())
    # a wrong layout (interleaved pairs) or a wrong theta would be far outside these bounds
    assert np.abs(want_cos[:, 1] - want_cos[:, D // 2]).max() > 0.1


# ------------------------------------------------------------------------------------------ double fidelity
def test_double_enforces_the_trtllm_contracts():
    from tensorrt_llm._torch.attention_backend.interface import PositionalEmbeddingParams, RopeParams
    from tensorrt_llm._torch.attention_backend.utils import create_attention
    from tensorrt_llm._torch.model_config import ModelConfig
    from tensorrt_llm._torch.pyexecutor.resource_manager import KVCacheManager
    from tensorrt_llm.bindings.internal.batch_manager import CacheType
    from tensorrt_llm.llmapi import KvCacheConfig
    from tensorrt_llm.functional import PositionEmbeddingType
    from tensorrt_llm.mapping import Mapping
    from transformers import PretrainedConfig

    from trtllm_loop.trtllm.torch_backend.modeling_iquest_loop import _get_layer_types

    gemma = PretrainedConfig(architectures=["Gemma3ForCausalLM"], num_hidden_layers=4)
    other = PretrainedConfig(architectures=["LlamaForCausalLM"], num_hidden_layers=4)
    assert len(_get_layer_types(ModelConfig(pretrained_config=gemma))) == 4
    assert _get_layer_types(ModelConfig(pretrained_config=other)) is None  # TRT-LLM's hack, untouched
    from tensorrt_llm.bindings import DataType
    kw = dict(num_layers=4, num_kv_heads=2, head_dim=8, tokens_per_block=4, max_seq_len=32, max_batch_size=1,
              mapping=Mapping(), dtype=DataType.FLOAT)
    with pytest.raises(AssertionError, match="layer_types have to be set correctly for VSWA"):
        KVCacheManager(KvCacheConfig(max_attention_window=[32, 4]), CacheType.SELF,
                       model_config=ModelConfig(pretrained_config=other).get_bindings_model_config(4), **kw)
    mgr = KVCacheManager(KvCacheConfig(max_attention_window=[32, 4]), CacheType.SELF,
                         model_config=ModelConfig(pretrained_config=gemma).get_bindings_model_config(4), **kw)
    rope = PositionalEmbeddingParams(type=PositionEmbeddingType.rope_gpt_neox, rope=RopeParams(dim=8, theta=1e4))
    md_cls = create_attention("TRTLLM", 1, 4, 8, 2, pos_embd_params=rope).Metadata
    from tensorrt_llm._torch.metadata import KVCacheParams
    mgr.add_dummy_requests([0], [3])
    md = md_cls(max_num_requests=1, max_num_tokens=8, kv_cache_manager=mgr, seq_lens=torch.tensor([3]),
                num_contexts=1, kv_cache_params=KVCacheParams(use_cache=True, num_cached_tokens_per_seq=[0]),
                request_ids=[0])
    md.prepare()
    qkv = torch.randn(3, (4 + 2 * 2) * 8)
    local = create_attention("TRTLLM", 1, 4, 8, 2, pos_embd_params=rope)
    # KV layer 1 has window 4: without attention_window_size the real op silently uses max_seq_len
    local.forward(qkv, None, None, md)
    assert md.window_mismatches == [(1, None, 4)]
    with pytest.raises(ValueError, match="Only fused QKV"):
        local.forward(qkv[:, :32], qkv[:, 32:48], qkv[:, 48:], md, attention_window_size=4)
    assert local.forward(qkv, None, None, md, attention_window_size=4).shape == (3, 32)
    mgr.shutdown()


# ------------------------------------------------------------------------------------------ user errors
def test_run_logits_user_errors(tmp_path, monkeypatch):
    from trtllm_loop.trtllm.torch_backend import runner

    d, ids, _ = golden("s2_mqa_w4_theta1e4_T8")
    for kw, match in [(dict(dtype="int8"), "--dtype 'int8'"), (dict(chunk=0), "must be positive"),
                      (dict(seqs=[[]]), "at least one token"), (dict(seqs=[[5, 128]]), "token id 128 is outside"),
                      (dict(tp_size=3), "tensor parallel size 3 does not fit .*allowed: \\[1, 2, 4\\]")]:
        seqs = kw.pop("seqs", [ids])
        with pytest.raises(UserError, match=match):
            run_logits(d, seqs, **kw)
    with pytest.raises(UserError, match="config.json"):
        run_logits(tmp_path, [[1]])
    monkeypatch.setattr(runner, "ensure_tensorrt_llm", lambda: (tllm, False))
    d4, _, _ = golden("s1_gqa4x2_w8_T29")
    with pytest.raises(UserError, match="serve.sh --tp N"):
        run_logits(d4, [ids], tp_size=2)


@pytest.mark.parametrize("name,tp", [("s1_gqa4x2_w8_T29", 4), ("s2_mqa_w4_theta1e4_T8", 2),
                                     ("s2_mqa_w4_theta1e4_T8", 4)])
def test_more_ranks_than_kv_heads_replicates_them(name, tp):
    """TRT-LLM's loader (duplicate_kv_weight) repeats each KV head for tp / num_kv_heads ranks."""
    d, ids, expected = golden(name)
    [got] = run_logits(d, [ids], chunk=5, tokens_per_block=4, tp_size=tp)
    assert maxdiff(got, expected) < TOL


def test_duplicate_kv_weight_hands_each_rank_its_kv_head():
    from tensorrt_llm._torch.models.modeling_utils import duplicate_kv_weight

    w = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2 * 3, 5)   # 2 KV heads of head_dim 3
    dup = duplicate_kv_weight(w, num_kv_heads=2, tensor_parallel_size=4)
    assert dup.shape == (12, 5)
    for rank in range(4):  # rank r serves query heads of KV head r // 2
        assert torch.equal(dup[3 * rank:3 * rank + 3], w[3 * (rank // 2):3 * (rank // 2) + 3])
    assert duplicate_kv_weight(w, 2, 2) is w


def test_quantized_checkpoints_refuse_kv_replication():
    d = f"{FIX}/modelopt_nvfp4"  # 2 KV heads
    with pytest.raises(UserError, match="replicates the 2 KV heads"):
        run_logits(d, [[1, 2, 3]], tp_size=4)


def test_config_view_round_trip_and_errors():
    from trtllm_loop.config import LoopConfig
    from trtllm_loop.trtllm.torch_backend.config_view import (IQuestLoopTrtllmConfig, loop_config_from_view,
                                                              to_view_dict)

    d, _, _ = golden("s3_gatebias2_g5_w8_T24")
    cfg = LoopConfig.from_file(d)
    view = to_view_dict(cfg)
    assert view["num_hidden_layers"] == 4 and view["num_unique_layers"] == 2
    assert not any("window" in k for k in view if k != "loop_window_size")  # windows: the slot plan only
    assert loop_config_from_view(IQuestLoopTrtllmConfig(**view)) == cfg == loop_config_from_view(view)
    with pytest.raises(ValueError, match="not a trtllm-loop deploy view"):
        loop_config_from_view(cfg.to_dict())
    with pytest.raises(ValueError, match="must be 2 \\* num_unique_layers"):
        loop_config_from_view(dict(view, num_hidden_layers=3))


@pytest.mark.parametrize("fused", ["0", "1"])
def test_bfloat16_matches_the_paged_runtime_and_the_golden_argmax(fused, monkeypatch):
    """BF16 (the production dtype of the gate and mix): with the plain torch ops the same numbers as the paged
    emulator's BF16 run; with the fused gate op (fp32 arithmetic inside, BF16 rounding once) within BF16 noise of
    it; both the golden FP32 logits within the BF16 tolerance the golden README gives (~5e-2 relative to logits ~2)."""
    monkeypatch.setenv(FUSED_GATE_ENV, fused)
    d, ids, expected = golden("s3_gatebias2_g5_w8_T24")
    seqs = [ids, ids[:9]]
    tb = compute(str(d), seqs, "torch-backend", dtype="bfloat16", chunk=5, tokens_per_block=4)
    pg = compute(str(d), seqs, "paged", dtype="bfloat16", chunk=5, tokens_per_block=4)
    for a, b in zip(tb, pg):
        assert maxdiff(a, b) < (1e-6 if fused == "0" else 0.1)
    assert maxdiff(tb[0], expected) < 0.2
    assert (tb[0].argmax(-1) == expected.argmax(-1)).all()


def test_pipeline_parallel_refused():
    from types import SimpleNamespace

    from tensorrt_llm._torch.model_config import ModelConfig

    from trtllm_loop.config import LoopConfig
    from trtllm_loop.trtllm.torch_backend.config_view import IQuestLoopTrtllmConfig, to_view_dict
    from trtllm_loop.trtllm.torch_backend.modeling_iquest_loop import TrtllmLoopForCausalLM

    d, _, _ = golden("s2_mqa_w4_theta1e4_T8")
    pretrained = IQuestLoopTrtllmConfig(**to_view_dict(LoopConfig.from_file(d)))
    pp2 = SimpleNamespace(pp_size=2, tp_size=1, tp_rank=0, rank=0, enable_attention_dp=False)
    with pytest.raises(ValueError, match="tensor parallelism only"):
        TrtllmLoopForCausalLM(ModelConfig(pretrained_config=pretrained, mapping=pp2))


# ------------------------------------------------------------------------------------------ the fused gate op
@pytest.fixture
def gate_op_built():
    assert op_available(), "torch.ops.trtllm_loop.gate_mix is not built: run `make plugins`"


def test_fused_gate_op_and_the_plain_torch_ops_both_give_the_golden_logits(gate_op_built, monkeypatch):
    """Pass 2 through torch.ops.trtllm_loop.gate_mix ($TRTLLM_LOOP_FUSED_GATE auto, the default where `make
    plugins` built it, or 1) and through the plain torch ops (0): the same golden logits, batched and chunked."""
    from trtllm_loop.trtllm.torch_backend import modeling_iquest_loop as m

    calls = {"fused": 0}
    fused_mix = m.TrtllmFusedGateBackend.gated_mix

    def spy(self, *a):
        calls["fused"] += 1
        return fused_mix(self, *a)

    monkeypatch.setattr(m.TrtllmFusedGateBackend, "gated_mix", spy)
    d, ids, expected = golden(GOLDEN_CASES[0])
    seqs = [ids, ids[:5]]
    outs = {}
    for mode in ("auto", "1", "0"):
        monkeypatch.setenv(FUSED_GATE_ENV, mode)
        before = calls["fused"]
        outs[mode] = run_logits(d, seqs, chunk=4, tokens_per_block=4, prefill_len=9)
        assert (calls["fused"] > before) == (mode != "0"), mode
        for s, got in zip(seqs, outs[mode]):
            assert maxdiff(got, expected[:len(s)]) < TOL, mode
    for a, b in zip(outs["1"], outs["0"]):  # fp32 gate arithmetic either way: only the summation order differs
        assert 0 < maxdiff(a, b) < 1e-5


def test_fused_gate_switch(gate_op_built, monkeypatch):
    from tensorrt_llm._torch.model_config import ModelConfig

    from trtllm_loop.config import LoopConfig
    from trtllm_loop.trtllm.torch_backend import modeling_iquest_loop as m
    from trtllm_loop.trtllm.torch_backend.config_view import IQuestLoopTrtllmConfig, to_view_dict

    view = IQuestLoopTrtllmConfig(**to_view_dict(LoopConfig.from_file(golden(GOLDEN_CASES[0])[0])))

    def model(mode):
        monkeypatch.setenv(FUSED_GATE_ENV, mode)
        return m.TrtllmLoopForCausalLM(ModelConfig(pretrained_config=view)).model

    cpu = torch.device("cpu")
    assert model("0").use_gate_op(cpu) is False
    assert model(" AUTO ").use_gate_op(cpu) is True and model("").use_gate_op(cpu) is True
    assert model("1").use_gate_op(cpu) is True
    with pytest.raises(ValueError, match="TRTLLM_LOOP_FUSED_GATE='yes': use auto .*, 0 .* or 1"):
        model("yes")
    monkeypatch.setattr(m, "op_available", lambda device: False)  # a library built without this device's kernel
    assert model("auto").use_gate_op(cpu) is False
    with pytest.raises(RuntimeError, match="TRTLLM_LOOP_FUSED_GATE=1 but .* has no cpu kernel: build it with"):
        model("1").use_gate_op(cpu)


def test_aten_ops_per_decode_step_of_pass_2(gate_op_built, tmp_path):
    """bench/gate_op_count.py's count (figures in bench/results/gate_op_count.md): with the op, pass 2's gate and
    mix are one op per layer; without it, exactly the ops of the torch composition (RoPE of q, gate, mix)."""
    import importlib.util

    from conftest import REPO
    from trtllm_loop.modeling.ops import apply_rope, gate, mix

    spec = importlib.util.spec_from_file_location("gate_op_count", REPO / "bench" / "gate_op_count.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    d, conf, _ = make_checkpoint(tmp_path / "ck", num_hidden_layers=3)
    plain, fused = bench.count(d, fused=False), bench.count(d, fused=True)
    L, H, D = 3, conf["num_attention_heads"], conf["head_dim"]
    assert fused["gate_mix_per_layer"] == [["trtllm_loop.gate_mix.default"]] * L
    q, g_out, l_out, cos, w, b = (torch.randn(*s) for s in ((1, H, D), (1, H, D), (1, H, D), (1, D), (H, D), (H,)))
    with bench.OpCounter() as c:  # the composition, counted on its own
        mix(gate(apply_rope(q, cos, cos), w, b), g_out, l_out)
    assert len(c.ops) >= 12 and "aten.sigmoid.default" in c.ops
    assert plain["gate_mix_per_layer"] == [c.ops] * L
    assert plain["attention_calls"] == fused["attention_calls"] == 3 * L
    assert plain["step_ops"] - fused["step_ops"] >= L * (len(c.ops) - 1)
