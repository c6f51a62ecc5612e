"""The shared golden cases in every `logits` mode, and the NumPy oracle against them."""
import json

import numpy as np
import pytest

from conftest import GOLDEN, GOLDEN_CASES, IN_CI, SHARED_GOLDEN, golden, oracle_weights
from loopref import forward
from trtllm_loop.conformance import compute

TOL = 1e-4


def test_shipped_golden_copy_equals_shared():
    """tests/data/golden is a byte-for-byte copy of shared/golden (where that folder is beside the repository)."""
    if not SHARED_GOLDEN.is_dir():
        assert not IN_CI, f"CI runs with shared/ beside the repository; {SHARED_GOLDEN} is missing"
        pytest.skip(f"{SHARED_GOLDEN} not beside this clone: nothing to compare the shipped copy with")
    shipped = sorted(p.relative_to(GOLDEN) for p in GOLDEN.rglob("*") if p.is_file() and p.name != "README.md")
    assert len(shipped) == 15  # 3 cases x (config, weights, ids, logits, case.json)
    for rel in shipped:
        assert (GOLDEN / rel).read_bytes() == (SHARED_GOLDEN / rel).read_bytes(), f"{rel} differs from shared/golden"


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_oracle_matches_golden(case):
    d, ids, expected = golden(case)
    cfg = json.loads((d / "config.json").read_text())
    got = forward(cfg, oracle_weights(d), ids)
    assert np.abs(got - expected).max() < 2e-5


@pytest.mark.parametrize("case", GOLDEN_CASES)
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_reference_modes_match_golden(case, mode):
    d, ids, expected = golden(case)
    [got] = compute(str(d), [ids], mode)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() < TOL


@pytest.mark.parametrize("case", GOLDEN_CASES)
@pytest.mark.parametrize("mode", ["paged", "torch-backend"])
@pytest.mark.parametrize("tpb,chunk,prefill_len", [(4, 5, None), (4, 5, 9), (1, 1, None), (16, 64, 3), (3, 7, 20)])
def test_batched_modes_match_golden(case, mode, tpb, chunk, prefill_len):
    """Several sequences of different lengths together (prefixes are valid sub-cases by causality)."""
    d, ids, expected = golden(case)
    seqs = [ids, ids[: len(ids) // 2], ids[:1], ids[: len(ids) - 1]]
    outs = compute(str(d), seqs, mode, tokens_per_block=tpb, chunk=chunk, prefill_len=prefill_len)
    for s, got in zip(seqs, outs):
        assert got.shape == (len(s), expected.shape[1])
        assert np.abs(got - expected[: len(s)]).max() < TOL
