"""Sampling: greedy, temperature, top-k, top-p, seeds; stop rules."""
import pytest
import torch

from trtllm_loop.runtime.sampling import SamplingParams, make_generator, sample, stop_reason

LOGITS = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0])


def draws(p, n=400, seed=0):
    g = make_generator(seed)
    return [sample(LOGITS.clone(), p, g) for _ in range(n)]


def test_greedy_is_argmax():
    assert set(draws(SamplingParams(temperature=0.0), 10)) == {1}


def test_top_k_restricts_to_the_k_best():
    assert set(draws(SamplingParams(temperature=1.0, top_k=2))) == {1, 3}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.softmax(LOGITS, -1)  # sorted: 1 (0.51), 3 (0.31), 2 (0.11), ...
    assert probs[1] < 0.6 < probs[1] + probs[3]
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.6))) == {1, 3}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5))) == {1}


def test_temperature_sampling_follows_the_distribution_and_seed_reproduces():
    d = draws(SamplingParams(temperature=1.0), n=4000, seed=1)
    freq = torch.bincount(torch.tensor(d), minlength=5).float() / len(d)
    assert torch.allclose(freq, torch.softmax(LOGITS, -1), atol=0.03)
    assert draws(SamplingParams(temperature=0.7), 50, seed=9) == draws(SamplingParams(temperature=0.7), 50, seed=9)
    assert draws(SamplingParams(temperature=0.7), 50, seed=9) != draws(SamplingParams(temperature=0.7), 50, seed=10)


def test_stop_rules():
    eos = (2, 75864, 75869)
    p = SamplingParams(max_tokens=5)
    assert stop_reason([7, 75869], p, eos) == "stop"  # any of the eos ids
    assert stop_reason([7, 8], p, eos) is None
    assert stop_reason([7, 8, 9, 10, 11], p, eos) == "length"
    assert stop_reason([7, 2], SamplingParams(ignore_eos=True), eos) is None
    assert stop_reason([7, 8, 9], SamplingParams(stop_sequences=[[8, 9]]), eos) == "stop"
    assert stop_reason([7, 9, 8], SamplingParams(stop_sequences=[[8, 9]]), eos) is None
    assert stop_reason([7, 5], SamplingParams(stop_token_ids=(5,)), eos) == "stop"


@pytest.mark.parametrize("bad,msg", [(dict(max_tokens=-1), "max_tokens"), (dict(top_p=0.0), "top_p"),
                                     (dict(top_k=-2), "top_k"), (dict(temperature=-1.0), "temperature"),
                                     (dict(stop_sequences=[[]]), "empty sequence")])
def test_invalid_params(bad, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**bad).validate()


def test_runtime_stops_on_eos_list(tiny_ckpt):
    """A model whose eos list contains the greedy token stops right there, with reason 'stop'."""
    from trtllm_loop.modeling.load import load_model
    from trtllm_loop.runtime import LoopRuntime

    model = load_model(tiny_ckpt, "float32")
    free = LoopRuntime(model).generate([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    rt = LoopRuntime(model)
    rid = rt.add_request([5, 6, 7], SamplingParams(max_tokens=6, stop_token_ids=(99999, free[2])))
    events = []
    while rt.has_unfinished():
        events += rt.step()
    got = [t for e in events for t in e.token_ids]
    assert got == free[: free.index(free[2]) + 1]
    assert events[-1].finished and events[-1].finish_reason == "stop" and events[-1].request_id == rid


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_runtime_refuses_non_finite_or_negative_temperature(bad):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        SamplingParams(temperature=bad).validate()


def test_embedding_bias_is_added_to_the_logits_first():
    # TensorRT-LLM's embedding_bias: logits + bias before greedy / sampling; a shorter bias leaves the rest alone
    assert set(draws(SamplingParams(temperature=0.0, embedding_bias=torch.tensor([0.0, 0.0, 2.5])), 5)) == {2}
    assert set(draws(SamplingParams(temperature=1.0, top_k=1, embedding_bias=torch.tensor([4.0])))) == {0}
    assert set(draws(SamplingParams(temperature=0.0, embedding_bias=torch.tensor([0.0, -9.0])), 5)) == {3}
    with pytest.raises(ValueError, match="embedding_bias has 6 values but the vocabulary has 5"):
        sample(LOGITS.clone(), SamplingParams(embedding_bias=torch.zeros(6)), make_generator(0))
    with pytest.raises(ValueError, match="embedding_bias must be a 1-D tensor of finite numbers"):
        SamplingParams(embedding_bias=torch.tensor([0.0, float("nan")])).validate()
