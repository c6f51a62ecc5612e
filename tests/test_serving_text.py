"""Text side of the Triton models without a server: incremental detokenization, stop strings, word lists,
the preprocessor (trtllm_loop.serving.textproc, copied into every rendered model as loop_text.py; the request
contract it is fed by has its own tests in test_serving_contract.py)."""
from __future__ import annotations

import json
import random

import numpy as np
import transformers
import pytest

from conftest import require

require("sentencepiece")

from trtllm_loop.serving import contract as rq  # noqa: E402
from trtllm_loop.serving import textproc as lt  # noqa: E402
from trtllm_loop.synth.tokenizer import write_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, 512)
    return transformers.AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_equals_full_decode(tok, skip):
    rng = random.Random(0)
    text = "héllo ✓ 你好 😀  wörld\n\tdef f(x): return x  # ünïcode"
    cases = [tok.encode(text)] + [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 60))] for _ in range(200)]
    for ids in cases:
        d = lt.IncrementalDetokenizer(tok, skip_special_tokens=skip)
        out, i = [], 0
        while i < len(ids):
            k = rng.randrange(1, 4)
            out.append(d.push(ids[i:i + k]))
            i += k
        out.append(d.flush())
        assert "".join(out) == tok.decode(ids, skip_special_tokens=skip), ids
    # one token at a time: never a broken character, spaces kept
    ids = tok.encode(text)
    d = lt.IncrementalDetokenizer(tok)
    pieces = [d.push([t]) for t in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert any(p.startswith(" ") for p in pieces)


def test_naive_per_token_decode_breaks_multibyte(tok):
    """The bug the BLS model fixes: per-token decoding splits byte-fallback characters."""
    ids = tok.encode("😀")
    assert len(ids) > 1
    assert "".join(tok.decode([t]) for t in ids) != "😀"
    p = lt.PieceText(tok)
    assert p(ids) == "😀"  # a whole sequence is decoded at once
    assert p(tok.encode(" world")[:1]).startswith(" ")  # leading space survives a lone token


def test_stop_strings():
    m = lt.StopStringMatcher(["world", "ab"])
    out = "".join(m.feed(c) for c in "hello wor ld a worl") + m.flush()
    assert out == "hello wor ld a worl" and not m.stopped
    m = lt.StopStringMatcher(["world"])
    out = "".join(m.feed(c) for c in ["hel", "lo wo", "rld and more"]) + m.flush()
    assert out == "hello world" and m.stopped  # the one stop-word rule: the stop word is returned
    # the stop word completed first wins (what a stream sees), whichever list position; streamed == whole
    for stops, want in ((["d a", "lo w", "lo"], "hello"), (["llo w", "o w"], "hello w"), (["rld", "wor"], "hello wor")):
        m = lt.StopStringMatcher(stops)
        assert "".join(m.feed(c) for c in "hello world and") + m.flush() == want
        assert lt.cut_at_stop("hello world and", stops) == (want, True)
    assert lt.cut_at_stop("abcabc", ["c", "bc"]) == ("abc", True)
    assert lt.cut_at_stop("abc", ["x"]) == ("abc", False)
    m = lt.StopStringMatcher([])
    assert m.feed("abc") == "abc"


def test_word_lists_round_trip():
    seqs = [[14480], [326, 262, 1171]]
    arr = rq.to_word_list(seqs)
    assert arr.tolist() == [[14480, 326, 262, 1171], [1, 4, -1, -1]]
    assert rq.from_word_list(arr[None]) == seqs
    assert rq.from_word_list(rq.to_word_list([])) == []
    with pytest.raises(rq.RequestError, match=r"shape \[2, N\]"):
        rq.from_word_list(np.zeros((3, 2), np.int32))


def _text_request(text, max_tokens, max_output_len=0, **fields):
    """A client request as Triton hands it to the BLS ([1, 1] tensors), parsed by the contract."""
    inputs = {"text_input": np.array([[text.encode()]], dtype=object),
              "max_tokens": np.array([[max_tokens]], np.int32)}
    for k, v in fields.items():
        if isinstance(v, bool):
            inputs[k] = np.array([[v]], np.bool_)
        else:
            inputs[k] = np.array([[x.encode() for x in v]] if isinstance(v, list) else [[v.encode()]], dtype=object)
    return rq.parse_text_request(rq.Inputs(inputs), max_output_len=max_output_len)


def test_preprocessor(tok):
    pre = lt.Preprocessor(tok, [2, tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id], max_input_len=20,
                          max_output_len=50)
    r = pre.prepare(_text_request("hi there", 5, stop_words=["there"]))
    assert r["input_ids"] == tok.encode("hi there") and r["end_id"] == tok.eos_token_id
    stops = rq.from_word_list(r["stop_words_list"])
    assert tok.encode("there") in stops and [2] in stops and [tok.pad_token_id] in stops
    chat = pre.prepare(_text_request("", 5, chat_messages=json.dumps([{"role": "user", "content": "hi"}])))
    assert chat["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert pre.prepare(_text_request("hi", 5, apply_chat_template=True))["prompt"] == chat["prompt"]
    assert pre.prepare(_text_request("hi", 5))["prompt"] == "hi"
    for kwargs, msg in [(dict(text="", max_tokens=3), "text_input is empty"),
                        (dict(text="x", max_tokens=0), "max_tokens must be >= 1, got 0"),
                        (dict(text="x", max_tokens=-4), "max_tokens must be >= 1, got -4"),
                        (dict(text="x", max_tokens=51), "max_output_len"),
                        (dict(text="word " * 40, max_tokens=3), "max_input_len"),
                        (dict(text="x", max_tokens=3, chat_messages="[{"), "chat_messages is not valid JSON"),
                        (dict(text="x", max_tokens=3, chat_messages='[{"role": 1}]'), "chat_messages must be")]:
        with pytest.raises(rq.RequestError, match=msg):
            pre.prepare(_text_request(kwargs.pop("text"), kwargs.pop("max_tokens"), max_output_len=50, **kwargs))
    no_template = lt.Preprocessor(_without_chat_template(tok))
    with pytest.raises(rq.RequestError, match="the tokenizer has no chat_template"):
        no_template.prepare(rq.TextRequest("hi", 5, chat=[{"role": "user", "content": "hi"}]))
    with pytest.raises(rq.RequestError, match="text_input is not valid UTF-8"):
        rq.decode_utf8(b"ab\xff\xfe", "text_input")
    assert rq.string_list(np.array([[b"a", b"", "b ✓".encode()]], dtype=object), "stop_words") == ["a", "b ✓"]
    with pytest.raises(rq.RequestError, match="stop_words has 65 entries"):
        rq.string_list(np.array([[b"w"] * 65], dtype=object), "stop_words")


def _without_chat_template(tok):
    """The same tokenizer with its chat template removed."""
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def test_client_checks_field_types():
    require("tritonclient.grpc")
    from trtllm_loop.serving.client import check_fields, grpc_inputs, request_fields

    f = request_fields("hi", 8, stop_words=["a"], temperature=0.5, seed=3, messages=[{"role": "user", "content": "x"}])
    assert check_fields(f) is f
    assert {i.name() for i in grpc_inputs(f)} == set(f)
    for bad, msg in [({"max_tokens": "ten"}, "max_tokens must be an integer, got 'ten'"),
                     ({"max_tokens": 1.5}, "max_tokens must be an integer"),
                     ({"text_input": 7}, "text_input must be a string"),
                     ({"stop_words": "x"}, "stop_words must be a list"),
                     ({"stream": 1}, "stream must be true/false"),
                     ({"max_token": 1}, "unknown request field 'max_token'")]:
        with pytest.raises(ValueError, match=msg):
            check_fields(bad)


def test_server_locate_and_errors(tmp_path, monkeypatch):
    from trtllm_loop.errors import UserError
    from trtllm_loop.serving.server import TritonServer, locate

    with pytest.raises(UserError, match="not a Triton model repository"):
        TritonServer(tmp_path)
    fake = tmp_path / "opt/tritonserver/bin/tritonserver"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    (tmp_path / "opt/tritonserver/backends").mkdir()
    monkeypatch.setenv("TRITONSERVER", str(fake))
    loc = locate()
    assert loc["kind"] == "system" and loc["binary"] == fake.resolve()
    repo = tmp_path / "repo"
    (repo / "m").mkdir(parents=True)
    (repo / "m/config.pbtxt").write_text('name: "m"\n')
    s = TritonServer(repo, log_path=tmp_path / "log")
    cmd = s.command(loc)
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(cmd)
    assert f"--backend-directory={tmp_path / 'opt/tritonserver/backends'}" in cmd
    with pytest.raises(UserError, match="exited with code 3"):
        s.start(timeout=20)
