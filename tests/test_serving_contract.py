"""The Triton request contract (trtllm_loop.serving.contract, copied into every rendered Python model as
loop_contract.py): every rule, asserted on the error message a client gets."""
from __future__ import annotations

import math

import numpy as np
import pytest

from trtllm_loop.serving import contract as rq


def llm(ids=(5, 6, 7), out_len=4, **extra):
    """tensorrt_llm inputs as Triton hands them to a Python model (max_batch_size > 0: a leading batch axis)."""
    t = {"input_ids": np.array([list(ids)], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
         "request_output_len": np.array([[out_len]], np.int32)}
    t.update(extra)
    return rq.Inputs({k: v for k, v in t.items() if v is not None})


def text(prompt="hi", max_tokens=4, **extra):
    """Client-contract inputs ([batch, 1] tensors), as the BLS receives them; None leaves an input out."""
    t = {"text_input": np.array([[prompt.encode()]], dtype=object),
         "max_tokens": max_tokens if isinstance(max_tokens, np.ndarray) else np.array([[max_tokens or 0]], np.int32)}
    if max_tokens is None:
        del t["max_tokens"]
    t.update(extra)
    return rq.Inputs({k: v for k, v in t.items() if v is not None})


def f32(v):
    return np.array([[v]], np.float32)


def i32(v):
    return np.array([[v]], np.int32)


def strings(*words):
    return np.array([[w.encode() for w in words]], dtype=object)


def fails(msg, fn, *a, **kw):
    with pytest.raises(rq.RequestError) as ei:
        fn(*a, **kw)
    assert msg in str(ei.value), str(ei.value)
    return str(ei.value)


# ----------------------------------------------------------------------------- tensorrt_llm requests
def test_llm_request_fields_and_defaults():
    r = rq.parse_llm_request(llm())
    assert r.input_ids == [5, 6, 7] and r.output_len == 4 and r.end_id is None and r.pad_id is None
    assert r.sampling == rq.Sampling() and r.stop_words == [] and r.bad_words == [] and r.returns == ()
    assert not r.streaming and not r.exclude_input and not r.embedding_bias and r.features() == {}
    assert rq.parse_llm_request(llm(), default_exclude=True).exclude_input
    keep = llm(exclude_input_in_output=np.array([[False]]))
    assert not rq.parse_llm_request(keep, default_exclude=True).exclude_input
    r = rq.parse_llm_request(llm(
        end_id=i32(2), pad_id=i32(0), streaming=np.array([[True]]), temperature=f32(0.5),
        runtime_top_k=i32(3), runtime_top_p=f32(0.9), seed=np.array([[7]], np.uint64),
        stop_words_list=rq.to_word_list([[8, 9], [4]])[None], bad_words_list=rq.to_word_list([[1]])[None],
        embedding_bias=np.zeros((1, 4), np.float32), return_log_probs=np.array([[True]]),
        beam_width=i32(2)))
    assert (r.end_id, r.pad_id, r.streaming) == (2, 0, True)
    assert r.sampling.given() == {"temperature": 0.5, "top_k": 3, "top_p": pytest.approx(0.9), "seed": 7,
                                  "beam_width": 2}
    assert r.stop_words == [[8, 9], [4]] and r.bad_words == [[1]] and r.embedding_bias
    assert r.returns == ("return_log_probs",)
    assert r.features() == {"beam_width": "beam_width=2", "return_log_probs": "return_log_probs",
                            "bad_words_list": "bad_words_list", "embedding_bias": "embedding_bias"}
    # an empty embedding_bias / word list (what the ensemble sends when the client sets none) is "unset"
    r = rq.parse_llm_request(llm(embedding_bias=np.zeros((1, 0), np.float32),
                                 bad_words_list=rq.to_word_list([])[None]))
    assert not r.embedding_bias and r.bad_words == [] and r.features() == {}
    r = rq.parse_llm_request(llm(embedding_bias=np.array([[0.5, -1, 0]], np.float32)), vocab_size=30)
    assert r.bias.tolist() == [0.5, -1, 0] and r.bias.dtype == np.float32
    fails("embedding_bias has 31 values but the vocabulary has 30", rq.parse_llm_request,
          llm(embedding_bias=np.zeros((1, 31), np.float32)), vocab_size=30)
    fails("embedding_bias must be finite numbers, got inf", rq.parse_llm_request,
          llm(embedding_bias=np.array([[0, np.inf]], np.float32)))


def test_llm_request_missing_inputs():
    fails("input_ids is missing: send the prompt token ids (INT32 [1, N])", rq.parse_llm_request,
          llm(input_ids=None))
    fails("request_output_len must be >= 1, got None", rq.parse_llm_request, llm(request_output_len=None))
    # input_lengths is optional: the whole row
    assert rq.parse_llm_request(llm(input_lengths=None)).input_ids == [5, 6, 7]


def test_llm_request_dtypes_and_shapes():
    fails("input_ids must be a tensor of INT32, got float32", rq.parse_llm_request,
          llm(input_ids=np.array([[5.0, 6.0]], np.float32)))
    fails("request_output_len must be a tensor of INT32, got float32", rq.parse_llm_request,
          llm(request_output_len=f32(4)))
    fails("streaming must be a tensor of BOOL, got int32", rq.parse_llm_request, llm(streaming=i32(1)))
    fails("temperature must be a tensor of FP32, got object", rq.parse_llm_request,
          llm(temperature=np.array([[b"hot"]], dtype=object)))
    fails("end_id must hold one value per prompt (shape [1, 1]), got shape [1, 2]", rq.parse_llm_request,
          llm(end_id=np.array([[2, 3]], np.int32)))
    fails("request_output_len must hold one value per prompt (shape [1, 1]), got shape [0]", rq.parse_llm_request,
          llm(request_output_len=np.zeros((0,), np.int32)))
    fails("input_ids must have shape [1, N], got [1, 1, 3]", rq.parse_llm_request,
          llm(input_ids=np.array([[[5, 6, 7]]], np.int32)))
    fails("input_ids is empty: send at least one token", rq.parse_llm_request,
          llm(input_ids=np.zeros((1, 0), np.int32), input_lengths=None))
    fails("stop_words_list must have shape [2, N] (ids row, offsets row), got [3, 2]", rq.parse_llm_request,
          llm(stop_words_list=np.zeros((1, 3, 2), np.int32)))
    fails("stop_words_list must have one row per prompt (shape [1, ...]), got shape [2, 2, 1]", rq.parse_llm_request,
          llm(stop_words_list=np.zeros((2, 2, 1), np.int32)))
    fails("bad_words_list has an offset 5 past its 2 ids", rq.parse_llm_request,
          llm(bad_words_list=np.array([[[1, 2], [5, -1]]], np.int32)))
    # a row without the batch axis is one prompt
    assert rq.parse_llm_request(llm(input_ids=np.array([5, 6], np.int32), input_lengths=None)).input_ids == [5, 6]


def test_llm_request_one_prompt_per_request():
    msg = fails("batch of 2 prompts in one request: tensorrt_llm takes one prompt per request", rq.parse_llm_request,
                llm(input_ids=np.array([[5, 6], [7, 8]], np.int32), input_lengths=np.array([[2], [2]], np.int32)))
    assert "send concurrent requests instead" in msg


def test_input_lengths_trims_padding_and_is_never_longer_than_the_ids():
    assert rq.parse_llm_request(llm(ids=(5, 6, 7, 0, 0), input_lengths=i32(3))).input_ids == [5, 6, 7]
    fails("input_lengths=4 but input_ids has 3 ids: send 1..3", rq.parse_llm_request, llm(input_lengths=i32(4)))
    fails("input_lengths=0 but input_ids has 3 ids: send 1..3", rq.parse_llm_request, llm(input_lengths=i32(0)))
    fails("input_lengths=-1 but input_ids has 3 ids", rq.parse_llm_request, llm(input_lengths=i32(-1)))


def test_token_ids_and_lengths_in_range():
    fails("input_ids contains 100, outside the vocabulary [0, 100)", rq.parse_llm_request, llm(ids=(5, 100)),
          vocab_size=100)
    fails("input_ids contains -3, outside the vocabulary [0, 100)", rq.parse_llm_request, llm(ids=(-3, 5)),
          vocab_size=100)
    fails("input_ids contains -3, outside the vocabulary [0, vocab_size)", rq.parse_llm_request, llm(ids=(-3,)))
    assert rq.parse_llm_request(llm(ids=(0, 99)), vocab_size=100).input_ids == [0, 99]
    # padding past input_lengths is not checked (it is not part of the prompt)
    assert rq.parse_llm_request(llm(ids=(5, -1), input_lengths=i32(1)), vocab_size=100).input_ids == [5]
    fails("the prompt is 8 tokens long; this model serves at most 7 prompt tokens (max_seq_len - 1)",
          rq.parse_llm_request, llm(ids=range(8)), max_seq_len=8)
    fails("request_output_len must be >= 1, got 0: ask for at least one token", rq.parse_llm_request, llm(out_len=0))
    fails("request_output_len must be >= 1, got -2", rq.parse_llm_request, llm(out_len=-2))
    # new tokens are clamped to the sequence length (TRT-LLM does the same)
    assert rq.parse_llm_request(llm(ids=range(6), out_len=100), max_seq_len=8).output_len == 2
    assert rq.parse_llm_request(llm(out_len=100)).output_len == 100


BAD_SAMPLING = [
    ("temperature", "temperature", math.nan, "must be >= 0 (0 = greedy), got nan"),
    ("temperature", "temperature", -0.5, "must be >= 0 (0 = greedy), got -0.5"),
    ("temperature", "temperature", math.inf, "must be >= 0 (0 = greedy), got inf"),
    ("top_p", "runtime_top_p", 0.0, "must be in (0, 1] (1 = off), got 0"),
    ("top_p", "runtime_top_p", 1.5, "must be in (0, 1] (1 = off), got 1.5"),
    ("top_p", "runtime_top_p", -0.1, "must be in (0, 1] (1 = off), got -0.1"),
    ("top_p", "runtime_top_p", math.nan, "must be in (0, 1] (1 = off), got nan"),
    ("top_k", "runtime_top_k", -1, "must be >= 0 (0 = off), got -1"),
    ("seed", "seed", -1, "must be >= 0, got -1"),
    ("length_penalty", "len_penalty", math.nan, "must be a finite number, got nan"),
    ("repetition_penalty", "repetition_penalty", 0.0, "must be > 0 (1 = off), got 0"),
    ("presence_penalty", "presence_penalty", math.inf, "must be a finite number (0 = off), got inf"),
    ("frequency_penalty", "frequency_penalty", -math.inf, "must be a finite number (0 = off), got -inf"),
    ("min_tokens", "min_tokens", -1, "must be >= 0, got -1"),
    ("beam_width", "beam_width", 0, "must be >= 1, got 0"),
    ("num_return_sequences", "num_return_sequences", 0, "must be >= 1, got 0"),
]


@pytest.mark.parametrize("client,tensor,value,msg", BAD_SAMPLING, ids=[f"{c}={v}" for c, _, v, _ in BAD_SAMPLING])
def test_sampling_rules_name_the_tensor(client, tensor, value, msg):
    kind = next(o.kind for o in rq.SAMPLING if o.name == client)
    arr = np.array([[value]], np.float32 if kind is float else np.int64)
    # tensorrt_llm: the tensor's own name, and the client field it comes from when that differs
    got = fails(f"{tensor} {msg}", rq.parse_llm_request, llm(**{tensor: arr}))
    assert got.endswith(f" (the client's {client})") == (tensor != client)
    # client contract (BLS / ensemble): the same rule under the client's name
    assert fails(f"{client} {msg}", rq.parse_text_request, text(**{client: arr})) == f"{client} {msg}"


def test_sampling_values_in_range_pass():
    s = rq.parse_llm_request(llm(temperature=f32(0), runtime_top_p=f32(1), runtime_top_k=i32(0),
                                 repetition_penalty=f32(1), min_tokens=i32(1), beam_width=i32(1))).sampling
    assert s.given() == {"temperature": 0, "top_p": 1, "top_k": 0, "repetition_penalty": 1, "min_tokens": 1,
                         "beam_width": 1}
    t = s.llm_tensors()
    assert set(t) == {"temperature", "runtime_top_p", "runtime_top_k", "repetition_penalty", "min_tokens",
                      "beam_width"}
    assert t["runtime_top_k"].dtype == np.int32 and t["runtime_top_k"].shape == (1, 1)
    assert rq.Sampling(seed=3).llm_tensors()["seed"].dtype == np.uint64


def test_unsupported_features_are_refused_by_name():
    ref = ("beam_width", "repetition_penalty", "min_tokens", *rq.RETURN_FLAGS, "bad_words_list", "embedding_bias")
    fails("beam_width=2 is not supported by the reference runtime: leave it unset or send 1",
          rq.parse_llm_request(llm(beam_width=i32(2))).reject, ref, "the reference runtime")
    fails("repetition_penalty=1.2 is not supported by X: leave it unset or send 1",
          rq.parse_llm_request(llm(repetition_penalty=f32(1.2))).reject, ref, "X")
    fails("return_context_logits is not supported by X: leave it unset",
          rq.parse_llm_request(llm(return_context_logits=np.array([[True]]))).reject, ref, "X")
    fails("bad_words_list is not supported by X",
          rq.parse_llm_request(llm(bad_words_list=rq.to_word_list([[3]])[None])).reject, ref, "X")
    # neutral values are not features; a model only refuses what it lists
    rq.parse_llm_request(llm(beam_width=i32(1), min_tokens=i32(1), repetition_penalty=f32(1.0),
                             return_log_probs=np.array([[False]]))).reject(ref, "X")
    rq.parse_llm_request(llm(presence_penalty=f32(0.5))).reject(ref, "X")


def test_stop_request():
    assert rq.is_stop(rq.Inputs({"stop": np.array([[True]])}))
    assert not rq.is_stop(rq.Inputs({"stop": np.array([[False]])})) and not rq.is_stop(llm())
    fails("stop must be a tensor of BOOL, got int32", rq.is_stop, rq.Inputs({"stop": i32(1)}))


# ----------------------------------------------------------------------------- client (text) requests
def test_text_request_fields_and_defaults():
    r = rq.parse_text_request(text("hello", 8))
    assert r == rq.TextRequest("hello", 8)
    assert rq.parse_text_request(text(), default_exclude=True).exclude_input
    r = rq.parse_text_request(text(
        "hi", 8, stop_words=strings("a", "", "b ✓"), bad_words=strings("x"), end_id=i32(2), pad_id=i32(0),
        stream=np.array([[True]]), exclude_input_in_output=np.array([[True]]), top_k=i32(4),
        return_log_probs=np.array([[False]])), default_exclude=False)
    assert (r.stop_words, r.bad_words, r.end_id, r.pad_id, r.stream, r.exclude_input) == (
        ["a", "b ✓"], ["x"], 2, 0, True, True)
    assert r.sampling == rq.Sampling(top_k=4) and r.return_log_probs is False and r.chat is None


def test_text_request_chat():
    sys_ = np.array([[b"be brief"]], dtype=object)
    r = rq.parse_text_request(text("hi", apply_chat_template=np.array([[True]]), system_prompt=sys_))
    assert r.chat == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    msgs = np.array([[b'[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]']], dtype=object)
    r = rq.parse_text_request(text("c", chat_messages=msgs))  # chat_messages implies the template
    assert [m["content"] for m in r.chat] == ["a", "b", "c"]
    # a system prompt without a chat is ignored (plain prompts have no turns)
    assert rq.parse_text_request(text("hi", system_prompt=sys_)).chat is None
    fails("chat_messages is not valid JSON", rq.parse_text_request,
          text(chat_messages=np.array([[b"[{"]], dtype=object)))
    fails('chat_messages must be a JSON list of {"role": str, "content": str} objects', rq.parse_text_request,
          text(chat_messages=np.array([[b'{"role": "user"}']], dtype=object)))
    fails("the chat is empty", rq.parse_text_request,
          text("", apply_chat_template=np.array([[True]]), system_prompt=sys_))
    fails("text_input is empty: send a non-empty prompt (or chat_messages)", rq.parse_text_request, text(""))


def test_text_request_missing_and_bad_inputs():
    fails("text_input is missing: send the prompt as a string", rq.parse_text_request, text(text_input=None))
    fails("max_tokens is missing: send the maximum number of tokens to generate (>= 1)", rq.parse_text_request,
          text(max_tokens=None))
    fails("max_tokens must be >= 1, got 0: ask for at least one token", rq.parse_text_request, text(max_tokens=0))
    fails("max_tokens must be >= 1, got -4", rq.parse_text_request, text(max_tokens=-4))
    fails("max_tokens=51 exceeds this server's maximum of 50 (max_output_len)", rq.parse_text_request,
          text(max_tokens=51), max_output_len=50)
    assert rq.parse_text_request(text(max_tokens=50), max_output_len=50).max_tokens == 50
    fails("max_tokens must be a tensor of INT32, got float32", rq.parse_text_request, text(max_tokens=f32(4)))
    fails("text_input must be a tensor of STRING, got int32", rq.parse_text_request, text(text_input=i32(7)))
    fails("apply_chat_template must be a tensor of BOOL, got float32", rq.parse_text_request,
          text(apply_chat_template=f32(1)))
    fails("text_input is not valid UTF-8 (invalid start byte at byte offset 3)", rq.parse_text_request,
          text(text_input=np.array([[b"ok \xff"]], dtype=object)))
    fails("stop_words is not valid UTF-8", rq.parse_text_request, text(stop_words=np.array([[b"\xfe"]], dtype=object)))
    fails("stop_words has 65 entries; at most 64 are allowed", rq.parse_text_request,
          text(stop_words=strings(*["w"] * 65)))
    fails("max_tokens must hold one value per prompt (shape [1, 1]), got shape [1, 2]", rq.parse_text_request,
          text(max_tokens=np.array([[4, 5]], np.int32)))


def test_text_batches():
    # the BLS takes one prompt per request
    two = rq.Inputs({"text_input": np.array([[b"a"], [b"b"]], dtype=object),
                     "max_tokens": np.array([[3], [4]], np.int32),
                     "STOP_WORDS_DICT": np.array([[b"x", b""], [b"y", b"z"]], dtype=object)})
    fails("send exactly one text_input per request (batch 1); use concurrent requests", rq.parse_text_request, two)
    # the preprocessing takes a batch, one TextRequest per row, each with its own row of every input
    pre = rq.Inputs({"QUERY": np.array([[b"a"], [b"b"]], dtype=object),
                     "REQUEST_OUTPUT_LEN": np.array([[3], [4]], np.int32),
                     "STOP_WORDS_DICT": np.array([[b"x", b""], [b"y", b"z"]], dtype=object)},
                    rq.PREPROCESSING_NAMES)
    rows = rq.parse_text_requests(pre)
    assert [(r.text, r.max_tokens, r.stop_words) for r in rows] == [("a", 3, ["x"]), ("b", 4, ["y", "z"])]
    # one bad row fails the request, naming the input as the client sent it
    bad = rq.Inputs({"QUERY": np.array([[b"a"], [b"b"]], dtype=object),
                     "REQUEST_OUTPUT_LEN": np.array([[3], [0]], np.int32)}, rq.PREPROCESSING_NAMES)
    fails("max_tokens must be >= 1, got 0", rq.parse_text_requests, bad)
    short = rq.Inputs({"QUERY": np.array([[b"a"], [b"b"]], dtype=object),
                       "REQUEST_OUTPUT_LEN": np.array([[3]], np.int32)}, rq.PREPROCESSING_NAMES)
    fails("max_tokens must hold one value per prompt (shape [2, 1]), got shape [1, 1]", rq.parse_text_requests, short)
    rows_bad = rq.Inputs({"QUERY": np.array([[b"a"], [b"b"]], dtype=object),
                          "REQUEST_OUTPUT_LEN": np.array([[3], [3]], np.int32),
                          "STOP_WORDS_DICT": np.array([[b"x"]] * 3, dtype=object)}, rq.PREPROCESSING_NAMES)
    fails("stop_words must have one row per prompt (shape [2, ...]), got shape [3, 1]", rq.parse_text_requests,
          rows_bad)


def test_error_text():
    assert rq.error_text(rq.RequestError("x is bad"), "m") == "x is bad"
    logged = []
    try:
        raise KeyError("k")
    except KeyError as e:
        text = rq.error_text(e, "tensorrt_llm", logged.append)
    assert text == "tensorrt_llm: internal error (KeyError: 'k'); the server log has the details"
    assert "Traceback" in logged[0] and "raise KeyError" in logged[0]  # the trace goes to the log only
    # one line, bounded, whatever the exception says
    text = rq.error_text(RuntimeError("line one\n  File x, line 3\n" + "y" * 2000), "m")
    assert "\n" not in text and "File x" not in text and len(text) <= rq.MAX_ERROR_CHARS
    assert "\n" not in rq.error_text(rq.RequestError("a\nb"), "m")


def test_llm_requests_batch_one_request_per_row():
    reqs = rq.parse_llm_requests(llm(input_ids=np.array([[5, 6, 7], [8, 9, 0]], np.int32),
                                     input_lengths=np.array([[3], [2]], np.int32),
                                     request_output_len=np.array([[4], [6]], np.int32),
                                     streaming=np.array([[False], [True]]),
                                     stop_words_list=np.stack([rq.to_word_list([[3]]), rq.to_word_list([[4]])])))
    assert [r.input_ids for r in reqs] == [[5, 6, 7], [8, 9]]
    assert [r.output_len for r in reqs] == [4, 6] and [r.streaming for r in reqs] == [False, True]
    assert [r.stop_words for r in reqs] == [[[3]], [[4]]]
    fails("request_output_len must hold one value per prompt (shape [2, 1]), got shape [1, 1]",
          rq.parse_llm_requests, llm(input_ids=np.array([[5], [6]], np.int32), input_lengths=None))
    fails("input_lengths=3 but input_ids has 2 ids", rq.parse_llm_requests,
          llm(input_ids=np.array([[5, 6], [7, 8]], np.int32), input_lengths=np.array([[2], [3]], np.int32),
              request_output_len=np.array([[1], [1]], np.int32)))


def test_text_requests_batch_and_the_batch_rule():
    reqs = rq.parse_text_requests(rq.Inputs({"text_input": np.array([[b"a"], [b"bc"]], dtype=object),
                                             "max_tokens": np.array([[3], [4]], np.int32)}))
    assert [(r.text, r.max_tokens) for r in reqs] == [("a", 3), ("bc", 4)]

    class Sender:
        def __init__(self):
            self.sent = []

        def send(self, response=None, flags=0):
            self.sent.append((response, flags))

    s = Sender()
    g = rq.BatchResponder(s, 2, 9)
    g.send("a0")
    g.send("b-last", last=True)
    g.send(None, last=False)     # nothing to say: not sent
    g.send("a-last", last=True)  # the last prompt ends the request
    assert s.sent == [("a0", 0), ("b-last", 0), ("a-last", 9)]
    s2 = Sender()
    g2 = rq.BatchResponder(s2, 1, 9)
    g2.send(None, last=True)
    assert s2.sent == [(None, 9)]
    # not decoupled: one response, the prompts' rows stacked (padded) once every prompt has ended, in row order
    s3 = Sender()
    g3 = rq.BatchResponder(s3, 2, 9, build=dict, merge=True)
    g3.send(parts=[("ids", np.array([[1, 2, 3]])), ("n", np.array([[3]]))], index=0)  # not last: nothing
    g3.send(parts=[("ids", np.array([[7]])), ("n", np.array([[1]])), ("batch_index", np.array([[5]]))], last=True,
            index=1)
    assert s3.sent == []
    g3.send(parts=[("ids", np.array([[1, 2, 3, 4]])), ("n", np.array([[4]])), ("batch_index", np.array([[0]]))],
            last=True, index=0)
    [(resp, flags)] = s3.sent
    assert flags == 9 and resp["ids"].tolist() == [[1, 2, 3, 4], [7, 0, 0, 0]] and resp["n"].tolist() == [[4], [1]]
    assert resp["batch_index"].tolist() == [[0], [1]]
    s4 = Sender()  # an error of one prompt is the request's one response; nothing after it
    g4 = rq.BatchResponder(s4, 2, 9, build=dict, merge=True)
    g4.send("err", last=True, index=1)
    g4.send(parts=[("ids", np.array([[1]]))], last=True, index=0)
    assert s4.sent == [("err", 9)]
    strings = rq.stack_rows([[("t", np.array([b"ab"], dtype=object))], [("t", np.array([b"c"], dtype=object))]])
    assert strings[0][1].tolist() == [b"ab", b"c"]
