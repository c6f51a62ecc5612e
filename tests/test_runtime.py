"""Paged runtime emulator: block pools, window trimming, re-append, in-flight batching, cancellation."""
import math

import pytest
import torch

from trtllm_loop.modeling.load import load_model
from trtllm_loop.runtime import LoopRuntime, SamplingParams
from trtllm_loop.runtime.attention import PagedBackend, StepMetadata


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt, "float32")


def greedy_reference(model, prompt, n):
    """Greedy continuation by full-sequence forwards (no cache at all)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 17, 42, 99, 7, 300, 12], list(range(10, 50)), [1, 3], list(range(100, 121))]


@pytest.mark.parametrize("tpb,chunk", [(4, 5), (1, 3), (16, 64), (5, 1)])
def test_batched_generation_equals_single_runs(model, tpb, chunk):
    single = [LoopRuntime(model, tokens_per_block=tpb, chunk_size=chunk, max_batch_size=1)
              .generate([p], SamplingParams(max_tokens=12, ignore_eos=True))[0] for p in PROMPTS]
    batched = LoopRuntime(model, tokens_per_block=tpb, chunk_size=chunk, max_batch_size=4, debug=True) \
        .generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    assert batched == single
    assert single[0] == greedy_reference(model, PROMPTS[0], 12)
    assert single[1] == greedy_reference(model, PROMPTS[1], 12)


def test_requests_join_and_finish_at_different_steps(model):
    rt = LoopRuntime(model, tokens_per_block=4, chunk_size=6, max_batch_size=2, debug=True)
    lengths = {}
    a = rt.add_request(PROMPTS[1], SamplingParams(max_tokens=10, ignore_eos=True))
    outs = {a: []}
    for step in range(40):
        if step == 3:
            b = rt.add_request(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
            c = rt.add_request(PROMPTS[3], SamplingParams(max_tokens=7, ignore_eos=True))  # waits for a slot
            outs.update({b: [], c: []})
        if step > 3 and not rt.has_unfinished():
            break
        for o in rt.step():
            outs[o.request_id] += o.token_ids
            if o.finished:
                lengths[o.request_id] = step
        assert len(rt.running) <= 2
    assert outs[a] == greedy_reference(model, PROMPTS[1], 10)
    assert outs[b] == greedy_reference(model, PROMPTS[0], 4)
    assert outs[c] == greedy_reference(model, PROMPTS[3], 7)
    assert len(set(lengths.values())) == 3  # three different finishing steps
    assert lengths[c] > lengths[b]  # c could only start once b or a had left


@pytest.mark.parametrize("tpb", [1, 3, 4, 16])
def test_window_slots_hold_at_most_ceil_w_over_tpb_plus_one_blocks(model, tpb):
    W = model.model.loop_config.loop_window_size
    rt = LoopRuntime(model, tokens_per_block=tpb, chunk_size=7, max_batch_size=2)
    rt.add_request(list(range(1, 60)), SamplingParams(max_tokens=30, ignore_eos=True))
    rt.add_request([4, 5], SamplingParams(max_tokens=40, ignore_eos=True))
    peak, steps = 0, 0
    while rt.has_unfinished():
        rt.step()
        steps += 1
        for r in rt.running:
            held = rt.cache.held_blocks(r.seq, W)
            peak = max(peak, held)
            assert held <= math.ceil(W / tpb) + 1
            # the full slots keep every token
            assert rt.cache.held_blocks(r.seq, None) == math.ceil(r.computed / tpb)
    assert peak >= math.ceil((W - 1) / tpb)  # the bound is reached, so the check is not vacuous
    assert rt.cache.used_blocks(None) == 0 and rt.cache.used_blocks(W) == 0  # all returned at the end


def test_global_reappend_leaves_pass1_slot_unchanged(model):
    cfg = model.model.loop_config
    rt = LoopRuntime(model, tokens_per_block=4, debug=True)
    seq = 7
    rt.cache.add_sequence(seq)
    meta = StepMetadata([seq], [0], [6])
    rt.cache.prepare(seq, 0, 6)
    backend = PagedBackend(rt.cache, meta, cfg, torch.float32)
    qkv = torch.randn(6, cfg.q_size + 2 * cfg.kv_size)
    out1 = backend.attend(0, qkv)
    k_before, v_before = rt.cache.read(0, seq, 0, 6)
    q2 = torch.randn(6, cfg.q_size)
    backend.attend(0, torch.cat([q2, qkv[:, cfg.q_size:]], -1))  # the idempotent re-append
    k_after, v_after = rt.cache.read(0, seq, 0, 6)
    assert torch.equal(k_before, k_after) and torch.equal(v_before, v_after)
    assert out1.shape == (6, cfg.num_attention_heads, cfg.head_dim)
    bad = qkv.clone()
    bad[:, cfg.q_size] += 1.0  # a different k1 would corrupt the pass-1 cache: debug mode refuses it
    with pytest.raises(AssertionError, match="re-append into slot 0"):
        backend.attend(0, bad)


def test_cancel_mid_generation_frees_blocks(model):
    rt = LoopRuntime(model, tokens_per_block=4)
    a = rt.add_request(PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    b = rt.add_request(PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True))
    got_b = []
    for _ in range(3):
        got_b += [t for o in rt.step() if o.request_id == b for t in o.token_ids]
    assert rt.cancel(a)
    assert not rt.cancel("nope")
    events = []
    while rt.has_unfinished():
        for o in rt.step():
            events.append((o.request_id, o.finished, o.finish_reason))
            if o.request_id == b:
                got_b += o.token_ids
    assert (a, True, "cancelled") in events
    assert rt.cache.used_blocks(None) == 0
    assert got_b == greedy_reference(model, PROMPTS[0], 5)  # the other request is unaffected


def test_kv_capacity_makes_requests_wait(model):
    # room for one 40-token sequence only: the second request waits, then runs; results are unaffected
    rt = LoopRuntime(model, tokens_per_block=4, max_batch_size=2,
                     num_blocks={None: 12, model.model.loop_config.loop_window_size: 40})
    outs = rt.generate([PROMPTS[1][:30], PROMPTS[0]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert outs[0] == greedy_reference(model, PROMPTS[1][:30], 8)
    assert outs[1] == greedy_reference(model, PROMPTS[0], 8)
    with pytest.raises(ValueError, match="needs 13 KV blocks; the pool has 12"):
        rt.add_request(list(range(1, 45)), SamplingParams(max_tokens=8))


def test_bad_requests_are_refused(model):
    rt = LoopRuntime(model, max_seq_len=32)
    with pytest.raises(ValueError, match="prompt is empty"):
        rt.add_request([])
    with pytest.raises(ValueError, match="max_seq_len is 32"):
        rt.add_request(list(range(40)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rt.add_request([1, 10**6])
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 0"):
        rt.add_request([1], SamplingParams(max_tokens=-1))
    # generation stops at max_seq_len
    [out] = rt.generate([list(range(1, 30))], SamplingParams(max_tokens=100, ignore_eos=True))
    assert len(out) == 3
