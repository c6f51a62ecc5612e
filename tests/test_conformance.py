"""New conformance cases (shapes, windows, tied embeddings, lengths up to 90) against the NumPy oracle,
in every `logits` mode; forced gates pin the local window and the global branch."""
import zlib

import numpy as np
import pytest

from conftest import make_checkpoint
from loopref import forward
from trtllm_loop.conformance import compute

TOL = 1e-4
CASES = {
    "tied_mqa_w4": dict(tie_word_embeddings=True, num_key_value_heads=1, loop_window_size=4),
    "mha_w1": dict(num_key_value_heads=4, loop_window_size=1),
    "gqa3_headdim_ne_hidden_w3": dict(num_attention_heads=6, num_key_value_heads=2, head_dim=10,
                                      loop_window_size=3, rope_theta=10000.0),
    "w64_T90_3layers": dict(loop_window_size=64, num_hidden_layers=3),
    "window_longer_than_seq": dict(loop_window_size=200),
}
LENGTHS = {"w64_T90_3layers": 90}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    d, conf, w = make_checkpoint(tmp_path_factory.mktemp(name), seed=zlib.crc32(name.encode()) % 1000, **CASES[name])
    T = LENGTHS.get(name, 37)
    ids = np.random.default_rng(len(name)).integers(0, conf["vocab_size"], T).tolist()
    return d, conf, w, ids, forward(conf, w, ids)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_reference_modes_match_oracle(case, mode):
    d, _, _, ids, expected = case
    [got] = compute(str(d), [ids], mode)
    assert np.abs(got - expected).max() < TOL


@pytest.mark.parametrize("mode", ["paged", "torch-backend"])
def test_batched_chunked_matches_oracle(case, mode):
    d, _, _, ids, expected = case
    seqs = [ids, ids[:11], ids[:2], ids[:-3]]
    outs = compute(str(d), seqs, mode, tokens_per_block=4, chunk=5)
    for s, got in zip(seqs, outs):
        assert np.abs(got - expected[: len(s)]).max() < TOL
    outs = compute(str(d), seqs, mode, tokens_per_block=3, chunk=7, prefill_len=6)
    for s, got in zip(seqs, outs):
        assert np.abs(got - expected[: len(s)]).max() < TOL


def test_case_is_sensitive_to_known_bugs(case):
    """The oracle's bug knobs move these logits far above tolerance, so passing above means something."""
    _, conf, w, ids, expected = case
    assert np.abs(forward(conf, w, ids, gate_pre_rope=True) - expected).max() > 100 * TOL
    assert np.abs(forward(conf, w, ids, global_from_loop1=True) - expected).max() > 100 * TOL
    if conf["loop_window_size"] < len(ids):
        assert np.abs(forward(conf, w, ids, window=conf["loop_window_size"] + 1) - expected).max() > 100 * TOL


@pytest.mark.parametrize("mode", ["prefill", "decode", "paged", "torch-backend"])
def test_pass2_window_includes_current_token(tmp_path, mode):
    """Gate forced to 0: pass 2 is pure local attention over exactly W = 64 keys including the current one."""
    d, conf, w = make_checkpoint(tmp_path, seed=5, gate_bias=-40.0, gate_weight_zero=True, loop_window_size=64)
    ids = np.random.default_rng(0).integers(0, conf["vocab_size"], 90).tolist()
    [got] = compute(str(d), [ids], mode, tokens_per_block=4, chunk=5)
    exact = forward(conf, w, ids, gate_override=0.0)
    assert np.abs(got - exact).max() < TOL
    for off_by_one in (63, 65):  # positions >= 64 see the difference
        wrong = forward(conf, w, ids, window=off_by_one, gate_override=0.0)
        assert np.abs(wrong[64:] - exact[64:]).max() > 100 * TOL
        assert np.abs(wrong[:63] - exact[:63]).max() < 1e-9  # before the window fills, W is irrelevant


@pytest.mark.parametrize("mode", ["prefill", "decode", "paged", "torch-backend"])
def test_global_branch_reads_pass1_kv(tmp_path, mode):
    """Gate forced to 1: pass 2 is pure global attention over the pass-1 K/V of the same layer."""
    d, conf, w = make_checkpoint(tmp_path, seed=6, gate_bias=40.0, gate_weight_zero=True, loop_window_size=4)
    ids = np.random.default_rng(1).integers(0, conf["vocab_size"], 30).tolist()
    [got] = compute(str(d), [ids], mode, tokens_per_block=4, chunk=5)
    exact = forward(conf, w, ids, gate_override=1.0)
    assert np.abs(got - exact).max() < TOL
    assert np.abs(forward(conf, w, ids, gate_override=1.0, global_from_loop1=True) - exact).max() > 100 * TOL
    # with g = 1 the local window cannot matter
    assert np.abs(forward(conf, w, ids, window=1, gate_override=1.0) - exact).max() < 1e-9
