"""Speculative decoding in the paged runtime: greedy output identical to normal decoding (every golden case,
synthetic models, K = 1..8, across the window edge, batched), exact rollback of both caches, the rejection
sampling rule, acceptance accounting, and the `generate --speculative` CLI."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import GOLDEN_CASES, golden, make_checkpoint
from trtllm_loop.modeling.load import load_model
from trtllm_loop.runtime import LoopRuntime, SamplingParams
from trtllm_loop.runtime.speculative import (DraftProposer, NgramProposer, Proposal, make_proposer, parse_spec,
                                             verify)

KS = range(1, 9)


def draft_of(model, k, tpb, batch=4, max_seq_len=512):
    return DraftProposer(model, k, tokens_per_block=tpb, max_batch_size=batch, max_seq_len=max_seq_len)


def run(model, prompts, max_tokens, tpb=4, chunk=16, spec=None):
    rt = LoopRuntime(model, tokens_per_block=tpb, chunk_size=chunk, max_batch_size=len(prompts), max_seq_len=512,
                     debug=True, speculative=spec)
    return rt.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)), rt


class OracleProposer:
    """Proposes the true greedy continuation with a wrong token at draft index ``wrong`` (None = all right):
    every accepted count 0..K occurs, so every rollback length is exercised."""

    def __init__(self, k, wrong, vocab):
        self.k, self.wrong, self.vocab, self.calls = k, wrong, vocab, 0
        self.truth = {}                                        # request's KV sequence id -> prompt + greedy output

    def propose(self, items):
        out = []
        for it in items:
            full = self.truth[it.key]
            assert full[:len(it.tokens)] == it.tokens
            d = full[len(it.tokens):len(it.tokens) + it.k]
            w = self.calls % (self.k + 1) if self.wrong == "cycle" else self.wrong
            if w is not None and w < len(d):
                d = d[:w] + [(d[w] + 1) % self.vocab] + d[w + 1:]
            out.append(Proposal(d))
            self.calls += 1
        return out

    def release(self, key):
        pass


# ---------------------------------------------------------------- golden cases
@pytest.fixture(scope="module")
def golden_models():
    return {c: load_model(golden(c)[0], "float32") for c in GOLDEN_CASES}


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_greedy_identical_ngram_and_draft(golden_models, case):
    d, ids, _ = golden(case)
    model = golden_models[case]
    W = model.model.loop_config.loop_window_size
    prompts = [ids[:5], ids[:9] + ids[:9], ids[:3]]          # different lengths, one repetitive
    n = 3 * W + 5                                            # prompt + output cross the window several times
    ref, _ = run(model, prompts, n)
    others = [m for c, m in golden_models.items() if c != case]
    for k in KS:
        out, rt = run(model, prompts, n, spec=NgramProposer(k))
        assert out == ref, f"ngram K={k}"
        other = draft_of(others[k % len(others)], k, 4)       # a different model: many rejections
        out, rt = run(model, prompts, n, spec=other)
        assert out == ref, f"draft K={k}"
        assert rt.spec_stats["proposed"] > 0
        assert rt.spec_stats["emitted"] == rt.spec_stats["accepted"] + rt.spec_stats["steps"]
    for p, r in zip(prompts, ref):
        assert len(p) + len(r) > 2 * W


def test_self_draft_accepts_everything_and_saves_steps(golden_models):
    model = golden_models[GOLDEN_CASES[0]]
    prompt, M = golden(GOLDEN_CASES[0])[1][:6], 30
    ref, base = run(model, [prompt], M)
    assert base.steps == M                                   # prefill + M - 1 decode steps
    for k in (1, 3, 8):
        out, rt = run(model, [prompt], M, spec=draft_of(model, k, 4))
        assert out == ref
        assert rt.spec_stats["accepted"] == rt.spec_stats["proposed"]
        assert rt.steps == 1 + -(-(M - 1) // (k + 1))        # every verification step emits k + 1 tokens


# ---------------------------------------------------------------- synthetic models, every rollback length
@pytest.mark.parametrize("window,tpb", [(1, 2), (3, 1), (4, 4), (8, 3)])
def test_synthetic_batched_every_accept_count(tmp_path, window, tpb):
    ckpt, _, _ = make_checkpoint(tmp_path / "m", seed=window, loop_window_size=window)
    model = load_model(ckpt, "float32")
    prompts = [[5, 6, 7], list(range(10, 31)), [40, 41, 40, 41, 40, 41, 40], list(range(60, 71))]
    M = 2 * window + 14
    ref, _ = run(model, prompts, M, tpb=tpb, chunk=5)
    for k in KS:
        for wrong in ("cycle", None, 0):
            prop = OracleProposer(k, wrong, model.model.loop_config.vocab_size)
            rt = LoopRuntime(model, tokens_per_block=tpb, chunk_size=5, max_batch_size=4, max_seq_len=512,
                             debug=True, speculative=prop)
            rids = [rt.add_request(p, SamplingParams(max_tokens=M, ignore_eos=True)) for p in prompts]
            prop.truth = {r.seq: p + out for r, p, out in zip(rt.waiting, prompts, ref)}
            got = {r: [] for r in rids}
            while rt.has_unfinished():
                for o in rt.step():
                    got[o.request_id] += o.token_ids
                    assert o.accepted <= o.proposed <= k
                    assert len(o.token_ids) <= o.accepted + 1
            assert [got[r] for r in rids] == ref, f"K={k} wrong={wrong}"
            if wrong == 0:
                assert rt.spec_stats["accepted"] == 0
            if wrong is None:
                assert rt.spec_stats["accepted"] == rt.spec_stats["proposed"]


def test_rollback_leaves_the_cache_of_normal_decoding(tmp_path):
    """After speculative steps with rejections, both caches hold what normal decoding holds: the same
    blocks per window group and the same K/V at every position a future query can read."""
    ckpt, _, _ = make_checkpoint(tmp_path / "m", seed=1, loop_window_size=4)
    model = load_model(ckpt, "float32")
    prompt, M = [7, 8, 9, 10, 11], 17
    ref, _ = run(model, [prompt], M)

    prop = OracleProposer(4, "cycle", 96)
    prop.truth = {0: prompt + ref[0]}
    spec = LoopRuntime(model, tokens_per_block=2, chunk_size=8, max_batch_size=1, max_seq_len=64, speculative=prop)
    spec.add_request(prompt, SamplingParams(max_tokens=M, ignore_eos=True))
    while not spec.running or spec.running[0].computed < 14:
        spec.step()
    r = spec.running[0]
    assert spec.spec_stats["accepted"] < spec.spec_stats["proposed"]      # rejections did happen
    plain = LoopRuntime(model, tokens_per_block=2, chunk_size=8, max_batch_size=1, max_seq_len=64)
    plain.add_request(prompt, SamplingParams(max_tokens=M, ignore_eos=True))
    while not plain.running or plain.running[0].computed < r.computed:
        plain.step()
    assert plain.running[0].computed == r.computed and plain.running[0].output == r.output
    n = r.computed
    for w in (None, 4):
        assert spec.cache.held_blocks(r.seq, w) == plain.cache.held_blocks(plain.running[0].seq, w)
    for slot in range(2 * model.model.loop_config.num_hidden_layers):
        lo = 0 if slot % 2 == 0 else n - 3                     # the window keeps the last W - 1 = 3 positions
        a = spec.cache.read(slot, r.seq, lo, n)
        b = plain.cache.read(slot, plain.running[0].seq, lo, n)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_trimming_at_the_speculative_length_would_lose_window_blocks(tmp_path):
    """Why window blocks are trimmed only at committed lengths: trimmed at the speculative end, the rollback
    needs a block already given back (the check in rollback fires)."""
    ckpt, _, _ = make_checkpoint(tmp_path / "m", seed=2, loop_window_size=4)
    rt = LoopRuntime(load_model(ckpt, "float32"), tokens_per_block=2, max_batch_size=1, max_seq_len=64)
    c = rt.cache
    c.add_sequence(0)
    c.prepare(0, 0, 10)
    c.trim(0, 10)                 # as if 10 tokens were committed
    c.prepare(0, 10, 6)           # a verification step of 1 + 5 tokens
    c.rollback(0, 11)             # fine: trimmed at the committed length
    c.prepare(0, 11, 6)
    c.trim(0, 17)                 # wrong: trimmed at the speculative end
    with pytest.raises(IndexError, match="already trimmed"):
        c.rollback(0, 12)


# ---------------------------------------------------------------- rejection sampling (temperature > 0)
def test_rejection_sampling_keeps_the_target_distribution():
    torch.manual_seed(0)
    V, N = 6, 6000
    target = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.0], [0.3, 0.1, 0.0, -0.2, 0.5, 0.0]])
    draft = torch.tensor([0.0, 2.0, 0.0, 0.5, -1.0, 1.0])
    params = SamplingParams(temperature=0.8)
    from trtllm_loop.runtime.sampling import probs

    p, q = probs(target[0], params), probs(draft, params)
    gen = torch.Generator().manual_seed(1)
    for name, make in (("draft", lambda: int(torch.multinomial(q, 1, generator=gen))), ("ngram", lambda: 1)):
        counts = torch.zeros(V)
        acc = 0
        for _ in range(N):
            d = make()
            prop = Proposal([d], q[None] if name == "draft" else None)
            emitted, a = verify(target, prop, params, gen)
            counts[emitted[0]] += 1
            acc += a
        freq = counts / N
        assert float((freq - p).abs().max()) < 0.02, (name, freq, p)
        expected_acc = float(torch.minimum(p, q).sum()) if name == "draft" else float(p[1])
        assert abs(acc / N - expected_acc) < 0.02


def test_sampled_self_draft_accepts_everything(golden_models):
    model = golden_models[GOLDEN_CASES[0]]
    rt = LoopRuntime(model, tokens_per_block=4, max_batch_size=2, max_seq_len=256, speculative=draft_of(model, 4, 4))
    out = rt.generate([[3, 4, 5], [9, 8]], SamplingParams(max_tokens=20, temperature=0.9, top_k=20, seed=5,
                                                          ignore_eos=True))
    assert [len(o) for o in out] == [20, 20]
    assert rt.spec_stats["accepted"] == rt.spec_stats["proposed"] > 0   # p == q: min(1, p/q) = 1


# ---------------------------------------------------------------- proposers, specs, CLI
def test_ngram_lookup():
    ng = NgramProposer(3)
    assert ng.lookup([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]
    assert ng.lookup([5, 1, 2, 9, 7, 1, 2], 2) == [9, 7]       # the latest earlier occurrence of the trigram/bigram
    assert ng.lookup([1, 2, 3], 3) == []
    assert ng.lookup([4, 4], 3) == [4]


def test_parse_spec():
    assert parse_spec("ngram") == ("ngram", None, 4)
    assert parse_spec("ngram:7") == ("ngram", None, 7)
    assert parse_spec("draft:/a/b") == ("draft", "/a/b", 4)
    assert parse_spec("draft:/a/b:2") == ("draft", "/a/b", 2)
    for bad in ("ngram:x", "ngram:0", "draft", "medusa:3", "ngram:17"):
        with pytest.raises(ValueError, match="speculative spec"):
            parse_spec(bad)


def test_draft_with_another_vocabulary_is_refused(tmp_path, golden_models):
    ckpt, _, _ = make_checkpoint(tmp_path / "v96", seed=0)
    with pytest.raises(ValueError, match="vocab_size 96 differs from the target's 128"):
        make_proposer(f"draft:{ckpt}:2", golden_models[GOLDEN_CASES[0]].model.loop_config, tokens_per_block=4,
                      max_batch_size=1, max_seq_len=64)


def test_generate_cli_speculative(tmp_path):
    d = golden(GOLDEN_CASES[0])[0]
    base = [sys.executable, "-m", "trtllm_loop.cli", "generate", str(d), "--prompt-ids", "3,4,5,3,4,5,3,4",
            "--prompt-ids", "9,10", "--max-tokens", "24", "--ignore-eos", "--json"]
    plain = subprocess.run(base, capture_output=True, text=True, check=True)
    recs = [json.loads(line) for line in plain.stdout.splitlines() if line.startswith("{")]
    for spec in ("ngram:4", f"draft:{d}:4"):
        r = subprocess.run(base + ["--speculative", spec], capture_output=True, text=True, check=True)
        got = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        assert [g["output_ids"] for g in got] == [x["output_ids"] for x in recs]
        assert all(0 <= g["acceptance_rate"] <= 1 and g["proposed"] > 0 for g in got)
        if spec.startswith("draft"):
            assert all(g["acceptance_rate"] == 1.0 for g in got)
    bad = subprocess.run(base + ["--speculative", "eagle:3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--speculative" in bad.stderr and "Traceback" not in bad.stderr
