"""The rendered `reference` repository on a real Triton server (the tritonserver bundled with nvidia-pytriton,
or $TRITONSERVER / the system one), started once for this module on 127.0.0.1 with free ports.

Ground truth is independent of the server: the reference model run in process (tests/groundtruth.py: load_model,
greedy argmax over full forwards) on the prompt tokenized by the HF tokenizer, with the stop ids read here from
generation_config.json, decoded by the HF tokenizer; never the server's own models, the paged runtime they run, or
the preprocessing code. Every request count here is bounded.
"""
from __future__ import annotations

import json
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import transformers
import pytest

from conftest import raw_stream, require, require_triton_server
from groundtruth import greedy, stop_ids

require("tritonclient.grpc")
require("sentencepiece")

from trtllm_loop.serving import contract as rq  # noqa: E402
from trtllm_loop.serving import textproc as lt  # noqa: E402
from trtllm_loop.serving.client import (TritonRequestError, grpc_generate, grpc_stream, http_generate,  # noqa: E402
                                        http_stream, request_fields)

MAX_SEQ_LEN, MAX_INPUT_LEN, MAX_OUTPUT_LEN = 512, 96, 400
PROMPTS = ["Hello world, 你好 😀 and  two spaces", "def add(a, b):\n    return a + b", "Café naïve façade ✓ → ∞",
           "The quick brown fox"]


require_triton_server()


class Env:
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from trtllm_loop.modeling.load import load_model
    from trtllm_loop.serving.render import render_repository
    from trtllm_loop.serving.server import TritonServer
    from trtllm_loop.synth import synthesize

    d = tmp_path_factory.mktemp("triton")
    ckpt = synthesize(d / "tiny", "tiny", dtype="float32")
    repo = render_repository("reference", ckpt, d / "repo", max_seq_len=MAX_SEQ_LEN, max_input_len=MAX_INPUT_LEN,
                             max_output_len=MAX_OUTPUT_LEN, max_batch_size=8)
    e = Env()
    e.repo = repo
    e.log = d / "server.log"
    e.server = TritonServer(repo, log_path=e.log).start(timeout=300)
    e.http, e.grpc = e.server.http_url, e.server.grpc_url
    e.tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    e.model = load_model(ckpt)
    # the stop semantics of triton_repo/README.md: the tokenizer's eos is TRT-LLM's end_id (not returned), the
    # model's other eos ids are single-token stop words (returned)
    e.end_id = e.tok.eos_token_id
    e.stop_ids = stop_ids(ckpt, e.end_id)
    yield e
    rc = e.server.stop()
    assert rc == 0, f"tritonserver exit code {rc}:\n{e.server.log_tail()}"


# ----------------------------------------------------------------------------- helpers


def llm_ids(env, prompt_ids, max_tokens, *, end_id=None, stops=None, streaming=False, exclude=True,
            request_id="", cancel_after=None):
    """Call `tensorrt_llm` directly, with the stop words the preprocessing would add."""
    end = env.end_id if end_id is None else end_id
    stop_seqs = (stops or []) + [[e] for e in env.stop_ids] if end_id is None else (stops or [])
    arrays = {"input_ids": np.array([prompt_ids], np.int32), "input_lengths": np.array([[len(prompt_ids)]], np.int32),
              "request_output_len": np.array([[max_tokens]], np.int32), "end_id": np.array([[end]], np.int32),
              "streaming": np.array([[streaming]], np.bool_), "exclude_input_in_output": np.array([[exclude]], np.bool_)}
    if stop_seqs:
        arrays["stop_words_list"] = rq.to_word_list(stop_seqs)[None]
    resps = raw_stream(env, "tensorrt_llm", arrays, request_id=request_id, cancel_after=cancel_after)
    ids = [o["output_ids"].reshape(-1)[:int(o["sequence_length"].reshape(-1)[0])].tolist()
           for o, _ in resps if "output_ids" in o]
    return ids if streaming else (ids[0] if ids else [])


def encode(env, prompt):
    return env.tok.encode(prompt, add_special_tokens=False)


def expected(env, prompt, max_tokens):
    """The reference model's greedy completion of ``prompt``: (ids, text)."""
    ids = greedy(env.model, encode(env, prompt), max_tokens, end_ids=(env.end_id,), stop_ids=env.stop_ids)
    return ids, env.tok.decode(ids, skip_special_tokens=True)


def piece_text(env, t):
    """What one token's text is when decoded on its own, from the vocabulary (SentencePiece: "\u2581" is a
    space, ``<0xNN>`` a byte -- a lone non-ASCII byte is no character), special tokens dropped."""
    special = env.tok.added_tokens_decoder.get(t)
    if t in env.tok.all_special_ids or (special is not None and special.special):
        return ""
    piece = env.tok.convert_ids_to_tokens(t)
    m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if m:
        b = int(m.group(1), 16)
        return chr(b) if b < 0x80 else "\ufffd"
    return piece.replace("\u2581", " ")


def log_lines(env, pattern):
    return [m for m in re.finditer(pattern, env.log.read_text(errors="replace"))]


def healthy_after(env):
    assert env.server.live() and env.server.ready()
    assert grpc_generate(env.grpc, "tensorrt_llm_bls", request_fields("ok", 2), stream=False) is not None


# ----------------------------------------------------------------------------- tests
def test_models_ready(env):
    with urllib.request.urlopen(f"http://{env.http}/v2") as r:
        meta = json.loads(r.read())
    assert meta["name"] == env.server.server_id  # the server we started answers, not another one
    for m in ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls"):
        with urllib.request.urlopen(f"http://{env.http}/v2/models/{m}/ready") as r:
            assert r.status == 200


def test_tensorrt_llm_matches_reference_model(env):
    for prompt in PROMPTS:
        ids, _ = expected(env, prompt, 24)
        assert ids, "the model generated nothing"
        assert llm_ids(env, encode(env, prompt), 24) == ids
        assert llm_ids(env, encode(env, prompt), 24, exclude=False) == encode(env, prompt) + ids
        assert sum(llm_ids(env, encode(env, prompt), 24, streaming=True), []) == ids


def test_rendered_models_use_the_copied_contract(env):
    """Every Python model directory holds the contract beside the text code, and they bind to each other (not
    to the installed package, which a stub may or may not be able to import)."""
    import subprocess
    import sys

    from trtllm_loop.serving import contract

    dirs = sorted(p.parent for p in env.repo.glob("*/1/model.py"))
    assert [d.parent.name for d in dirs] == ["postprocessing", "preprocessing", "tensorrt_llm", "tensorrt_llm_bls"]
    for d in dirs:
        assert (d / "loop_contract.py").read_text() == open(contract.__file__, encoding="utf-8").read()
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import loop_contract, loop_text; "
                "assert loop_text.contract is loop_contract, loop_text.contract")
        subprocess.run([sys.executable, "-c", code, str(d)], check=True)


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_non_streamed_text_matches_reference_model(env, model):
    for prompt in PROMPTS[:2]:
        ids, text = expected(env, prompt, 24)
        assert ids, "the model generated nothing"
        f = request_fields(prompt, 24)
        assert http_generate(env.http, model, f) == text
        assert grpc_generate(env.grpc, model, f, stream=False) == text
        # prompt echoed (exclude_input_in_output false): the multi-byte prompt round-trips exactly
        full = http_generate(env.http, model, request_fields(prompt, 24, exclude_input_in_output=False))
        assert full == prompt + text
        assert full == env.tok.decode(encode(env, prompt) + ids, skip_special_tokens=True)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bls_streamed_equals_non_streamed(env, protocol):
    for prompt in PROMPTS:
        f = request_fields(prompt, 40)
        whole = http_generate(env.http, "tensorrt_llm_bls", f)
        assert whole == expected(env, prompt, 40)[1]
        if protocol == "grpc":
            pieces = list(grpc_stream(env.grpc, "tensorrt_llm_bls", f))
        else:
            pieces = list(http_stream(env.http, "tensorrt_llm_bls", f))
        assert len(pieces) > 1, "not streamed"
        assert "".join(pieces) == whole
        # streaming never echoes the prompt, whatever exclude_input_in_output says (upstream's BLS does not
        # either, and Triton's OpenAI frontend never sends the flag); non-streamed text echoes it when asked
        f2 = request_fields(prompt, 40, exclude_input_in_output=False)
        assert "".join(grpc_stream(env.grpc, "tensorrt_llm_bls", f2)) == whole
        assert http_generate(env.http, "tensorrt_llm_bls", f2) == prompt + whole


def test_stream_of_known_text_never_splits_characters(env):
    """Streamed text arrives in whole characters: every piece decodes on its own to no U+FFFD unless the
    reference decode of the whole completion has one there too."""
    for prompt in PROMPTS:
        ids, text = expected(env, prompt, 40)
        pieces = list(grpc_stream(env.grpc, "tensorrt_llm_bls", request_fields(prompt, 40)))
        assert "".join(pieces) == text
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces)


def test_ensemble_streams_per_token(env):
    prompt = PROMPTS[0]
    ids, text = expected(env, prompt, 20)
    pieces = list(grpc_stream(env.grpc, "ensemble", request_fields(prompt, 20)))
    assert pieces == [s for s in (piece_text(env, t) for t in ids) if s]
    assert "".join(pieces).replace("\ufffd", "") == "".join(piece_text(env, t) for t in ids).replace("\ufffd", "")
    # spaces survive the postprocessing's per-token decoding (SentencePiece puts them in the next token)
    per_token = lt.PieceText(env.tok)
    assert "".join(per_token([t]) for t in encode(env, "The quick brown fox")) == "The quick brown fox"
    # streaming over HTTP SSE gives the same responses
    assert list(http_stream(env.http, "ensemble", request_fields(prompt, 20))) == pieces


def _pick_stop_word(env, ids):
    """Two generated tokens whose text tokenizes back to exactly them and occurs first at their place."""
    tok = env.tok
    for k in range(2, len(ids) - 2):
        w = tok.decode(ids[k:k + 2])
        prefix = tok.decode(ids[:k], skip_special_tokens=True)
        full = tok.decode(ids, skip_special_tokens=True)
        if (w.strip() and "\ufffd" not in w and tok.encode(w) == ids[k:k + 2] and full.find(w) == len(prefix)
                and not any(t in tok.all_special_ids for t in ids[:k + 2])):
            return k, w
    return None, None


def test_stop_words(env):
    for prompt in PROMPTS:
        ids, text = expected(env, prompt, 40)
        k, word = _pick_stop_word(env, ids)
        if word is not None:
            break
    assert word is not None, "no usable stop word in the generated text"
    f = request_fields(prompt, 40, stop_words=[word])
    # the one stop-word rule (triton_repo/README.md): generation ends at the stop word, which is returned -- on
    # the ensemble (token-level, in tensorrt_llm) and the BLS (text-level), streamed and not
    want = env.tok.decode(ids[:k + 2], skip_special_tokens=True)
    assert want.endswith(word) and want != text
    assert http_generate(env.http, "tensorrt_llm_bls", f) == want
    assert "".join(grpc_stream(env.grpc, "tensorrt_llm_bls", f)) == want
    assert http_generate(env.http, "ensemble", f) == want
    assert grpc_generate(env.grpc, "ensemble", f, stream=False) == want


def test_chat_template_applied_server_side(env):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "写一个 hello world"}]
    rendered = env.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    want = expected(env, rendered, 16)[1]
    assert http_generate(env.http, "tensorrt_llm_bls", request_fields(rendered, 16)) == want
    for model in ("tensorrt_llm_bls", "ensemble"):
        assert http_generate(env.http, model, request_fields(messages=msgs, max_tokens=16)) == want
    one = request_fields("写一个 hello world", 16, chat=True, system_prompt="You are terse.")
    assert grpc_generate(env.grpc, "tensorrt_llm_bls", one) == want


def test_concurrent_requests_batch_and_match_single_runs(env):
    prompts = [f"{p} #{i}" for i, p in enumerate(PROMPTS * 2)]  # 8 prompts of different lengths
    single = [expected(env, p, 24)[1] for p in prompts]

    def run(i):
        f = request_fields(prompts[i], 24)
        if i % 2:
            return "".join(grpc_stream(env.grpc, "tensorrt_llm_bls", f, request_id=f"conc-{i}"))
        return "".join(grpc_stream(env.grpc, "ensemble", f, stream=False, request_id=f"conc-{i}"))

    with ThreadPoolExecutor(8) as ex:
        together = list(ex.map(run, range(8)))
    assert together == single
    pat = r"request '(?:bls-)?conc-\d+[^']*' finished \(\w+\) after \d+ tokens; peak in-flight batch (\d+)"
    deadline = time.monotonic() + 20  # the model logs after sending the final response: wait for the log
    while len(log_lines(env, pat)) < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    peaks = [int(m.group(1)) for m in log_lines(env, pat)]
    assert len(peaks) == 8
    assert max(peaks) >= 2, f"requests were not batched by the in-flight scheduler: {peaks}"


def _long_prompt(env):
    """A prompt whose greedy continuation does not stop for a long time (random weights: checked, not assumed)."""
    for p in PROMPTS + ["x", "1 2 3"]:
        if len(expected(env, p, 200)[0]) == 200:
            return p
    pytest.fail("every probe prompt hit an eos token within 200 tokens")


def test_cancel_mid_stream(env):
    # tensorrt_llm directly: the client cancels its gRPC stream after 3 responses
    got = llm_ids(env, encode(env, "count"), MAX_OUTPUT_LEN, end_id=-1, streaming=True,
                  request_id="cancel-direct", cancel_after=3)
    assert len(got) == 3
    # BLS: cancel after a few streamed pieces; the BLS stops its tensorrt_llm request
    prompt = _long_prompt(env)
    got = raw_stream(env, "tensorrt_llm_bls", {
        "text_input": np.array([[prompt.encode()]], dtype=object),
        "max_tokens": np.array([[MAX_OUTPUT_LEN]], np.int32), "stream": np.array([[True]], np.bool_)},
        request_id="cancel-bls", cancel_after=3)
    assert len(got) == 3
    deadline = time.monotonic() + 30
    pat = r"request '{}[^']*' finished \((\w+)\) after (\d+) tokens"
    while time.monotonic() < deadline:
        d = log_lines(env, pat.format("cancel-direct"))
        b = log_lines(env, pat.format("bls-cancel-bls"))
        if d and b:
            break
        time.sleep(0.2)
    assert d and d[0].group(1) == "cancelled" and int(d[0].group(2)) < MAX_OUTPUT_LEN
    assert b and b[0].group(1) == "cancelled" and int(b[0].group(2)) < MAX_OUTPUT_LEN
    healthy_after(env)


BAD_HTTP = [
    ("ensemble", {"text_input": "hi"}, "max_tokens"),                         # missing required field
    ("tensorrt_llm_bls", {"text_input": "hi"}, "max_tokens"),
    # wrong type: rejected by Triton's own JSON parser before any model runs (its message, not ours)
    ("ensemble", {"text_input": "hi", "max_tokens": "ten"}, "Unable to parse 'data'"),
    ("tensorrt_llm_bls", {"text_input": "hi", "max_tokens": 1.5}, "Unable to parse 'data'"),
    ("tensorrt_llm_bls", {"text_input": 7, "max_tokens": 4}, "Unable to parse JSON bytes array"),
    ("ensemble", {"text_input": "", "max_tokens": 4}, "text_input is empty"),
    ("tensorrt_llm_bls", {"text_input": "", "max_tokens": 4}, "text_input is empty"),
    ("ensemble", {"text_input": "word " * 200, "max_tokens": 4}, "max_input_len"),
    ("tensorrt_llm_bls", {"text_input": "word " * 200, "max_tokens": 4}, "max_input_len"),
    ("ensemble", {"text_input": "hi", "max_tokens": 0}, "max_tokens must be >= 1, got 0"),
    ("tensorrt_llm_bls", {"text_input": "hi", "max_tokens": -3}, "max_tokens must be >= 1, got -3"),
    ("tensorrt_llm_bls", {"text_input": "hi", "max_tokens": MAX_OUTPUT_LEN + 1}, "max_output_len"),
    ("tensorrt_llm_bls", {"text_input": "hi", "max_tokens": 4, "chat_messages": "[{"}, "chat_messages is not valid JSON"),
    ("ensemble", {"text_input": "hi", "max_tokens": 4, "beam_width": 2}, "beam_width=2 is not supported"),
    ("tensorrt_llm_bls", {"text_input": "hi", "max_tokens": 4, "top_p": 1.5}, "top_p must be in (0, 1]"),
    ("no_such_model", {"text_input": "hi", "max_tokens": 4}, "unknown model"),
]


@pytest.mark.parametrize("model,body,msg", BAD_HTTP, ids=[f"{m}-{msg[:20]}" for m, _, msg in BAD_HTTP])
def test_bad_request_http(env, model, body, msg):
    for stream in (False, True):
        with pytest.raises(TritonRequestError) as ei:
            http_generate(env.http, model, dict(body), stream=stream, validate=False)
        assert msg in str(ei.value)
    healthy_after(env)


def test_bad_request_grpc(env):
    def send(model, arrays):
        return raw_stream(env, model, arrays)

    base = {"max_tokens": np.array([[4]], np.int32)}
    for model in ("ensemble", "tensorrt_llm_bls"):
        with pytest.raises(TritonRequestError, match="text_input is not valid UTF-8"):
            send(model, {"text_input": np.array([[b"ok \xff\xfe broken"]], dtype=object), **base})
        with pytest.raises(TritonRequestError, match="max_tokens"):
            send(model, {"text_input": np.array([[b"hi"]], dtype=object)})
        with pytest.raises(TritonRequestError, match="max_tokens must be >= 1, got 0"):
            send(model, {"text_input": np.array([[b"hi"]], dtype=object), "max_tokens": np.array([[0]], np.int32)})
        with pytest.raises(TritonRequestError, match="INT32"):  # wrong dtype for max_tokens
            send(model, {"text_input": np.array([[b"hi"]], dtype=object), "max_tokens": np.array([[4.0]], np.float32)})
    # tensorrt_llm directly: prompt longer than max_seq_len, token ids outside the vocabulary
    with pytest.raises(TritonRequestError, match="max_seq_len"):
        llm_ids(env, [5] * (MAX_SEQ_LEN + 10), 4)
    with pytest.raises(TritonRequestError, match="outside the vocabulary"):
        llm_ids(env, [5, 100000], 4)
    arrays = {"input_ids": np.array([[5, 6]], np.int32), "input_lengths": np.array([[3]], np.int32),
              "request_output_len": np.array([[4]], np.int32)}
    with pytest.raises(TritonRequestError, match=re.escape("input_lengths=3 but input_ids has 2 ids: send 1..2")):
        send("tensorrt_llm", arrays)
    with pytest.raises(TritonRequestError, match=re.escape("temperature must be >= 0 (0 = greedy), got nan")):
        send("tensorrt_llm", {**arrays, "input_lengths": np.array([[2]], np.int32),
                              "temperature": np.array([[np.nan]], np.float32)})
    with pytest.raises(TritonRequestError, match="unknown model"):
        send("nope", {"text_input": np.array([[b"hi"]], dtype=object), **base})
    healthy_after(env)


def test_cli_client_streams_chat(env, capsys):
    from trtllm_loop.cli import main

    chat = env.tok.apply_chat_template([{"role": "user", "content": "hi 你好"}], tokenize=False,
                                       add_generation_prompt=True)
    want = expected(env, chat, 12)[1]
    assert main(["client", "--url", env.grpc, "--chat", "hi 你好", "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["client", "--url", env.http, "--protocol", "http", "--prompt", "hi", "--max-tokens", "0"]) == 2
    assert "max_tokens must be >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- isolation (issue 10, item 7)
NON_FINITE = [("temperature", np.float32(np.nan)), ("temperature", np.float32(np.inf)),
              ("top_p", np.float32(np.nan)), ("repetition_penalty", np.float32(np.inf)),
              ("length_penalty", np.float32(-np.inf)), ("presence_penalty", np.float32(np.nan))]


def test_non_finite_sampling_refused_while_others_complete_identically(env):
    """NaN / inf sampling values are refused at parse time, naming the field, on every model, while concurrent
    good requests on every model complete exactly as the reference model says."""
    good_prompts = PROMPTS[:3]
    want = [expected(env, p, 20)[1] for p in good_prompts]

    def good(i):
        f = request_fields(good_prompts[i % 3], 20)
        model = ("ensemble", "tensorrt_llm_bls")[i % 2]
        return "".join(grpc_stream(env.grpc, model, f, stream=bool(i % 2) and model == "tensorrt_llm_bls"))

    def bad(j):
        name, value = NON_FINITE[j % len(NON_FINITE)]
        model = ("ensemble", "tensorrt_llm_bls", "tensorrt_llm")[j % 3]
        if model == "tensorrt_llm":
            llm = {"temperature": "temperature", "top_p": "runtime_top_p", "length_penalty": "len_penalty"}.get(
                name, name)
            arrays = {"input_ids": np.array([encode(env, "hi")], np.int32),
                      "input_lengths": np.array([[len(encode(env, "hi"))]], np.int32),
                      "request_output_len": np.array([[8]], np.int32), llm: np.array([[value]], np.float32)}
            name = llm
        else:
            arrays = {"text_input": np.array([[b"hello"]], dtype=object), "max_tokens": np.array([[8]], np.int32),
                      name: np.array([[value]], np.float32)}
        try:
            raw_stream(env, model, arrays)
        except TritonRequestError as e:
            return name, str(e)
        return name, None

    with ThreadPoolExecutor(12) as ex:
        goods = [ex.submit(good, i) for i in range(6)]
        bads = [ex.submit(bad, j) for j in range(12)]
        got_good = [f.result(timeout=120) for f in goods]
        got_bad = [f.result(timeout=120) for f in bads]
    assert got_good == [want[i % 3] for i in range(6)]
    for name, err in got_bad:
        assert err is not None, f"{name}: a non-finite value was accepted"
        assert re.search(rf"{name} must be .*, got (nan|inf|-inf)", err), err
        assert "Traceback" not in err and "\n" not in err
    healthy_after(env)


def test_non_finite_and_out_of_range_over_http_are_400(env):
    for model in ("ensemble", "tensorrt_llm_bls"):
        conn, r = __import__("trtllm_loop.serving.client", fromlist=["_http_post"])._http_post(
            env.http, f"/v2/models/{model}/generate", {"text_input": "hi", "max_tokens": 4, "top_p": 1.5}, 30)
        body = r.read().decode()
        conn.close()
        assert r.status == 400, (model, r.status, body)
        assert "top_p must be in (0, 1]" in body


def test_prompt_bytes_bounded_before_tokenizing(env):
    """An 8 MB prompt is refused at once by its byte size (never tokenized), and a request sent at the same time
    completes normally."""
    huge = "word " * (8 * 1024 * 1024 // 5)
    want = expected(env, PROMPTS[1], 12)[1]
    with ThreadPoolExecutor(3) as ex:
        t0 = time.monotonic()
        futs = [ex.submit(http_generate, env.http, m, request_fields(huge, 4), validate=False)
                for m in ("tensorrt_llm_bls", "ensemble")]
        ok = ex.submit(grpc_generate, env.grpc, "tensorrt_llm_bls", request_fields(PROMPTS[1], 12), stream=True)
        for f in futs:
            with pytest.raises(TritonRequestError, match=r"bytes .*max_prompt_bytes"):
                f.result(timeout=60)
        assert ok.result(timeout=60) == want
        assert time.monotonic() - t0 < 30


def test_no_traceback_reaches_a_client(env):
    deep = "[" * 200000 + "]" * 200000
    for model in ("ensemble", "tensorrt_llm_bls"):
        with pytest.raises(TritonRequestError) as ei:
            http_generate(env.http, model, {"text_input": "hi", "max_tokens": 4, "chat_messages": deep}, validate=False)
        msg = str(ei.value)
        assert "chat_messages" in msg and "Traceback" not in msg and "File " not in msg, msg
    # postprocessing with ids outside the vocabulary: a named refusal, not an OverflowError trace
    for bad in (-5, 10 ** 6):
        with pytest.raises(TritonRequestError) as ei:
            raw_stream(env, "postprocessing", {"TOKENS_BATCH": np.array([[[5, bad]]], np.int32),
                                              "SEQUENCE_LENGTH": np.array([[2]], np.int32)})
        assert f"TOKENS_BATCH contains {bad}, outside the vocabulary" in str(ei.value)
        assert "Traceback" not in str(ei.value)
    healthy_after(env)


def test_max_tokens_cut_is_logged_by_tensorrt_llm(env):
    """tensorrt_llm cuts request_output_len to fit max_seq_len like TRT-LLM, and says so in the server log."""
    prompt = [5] * 300
    got = llm_ids(env, prompt, MAX_OUTPUT_LEN, end_id=-1, request_id="cut-me")
    assert len(got) == MAX_SEQ_LEN - len(prompt)
    deadline = time.monotonic() + 10
    pat = rf"request 'cut-me': request_output_len {MAX_OUTPUT_LEN} cut to {MAX_SEQ_LEN - 300}"
    while not log_lines(env, pat) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log_lines(env, pat)


# ----------------------------------------------------------------------------- batches (rq.BatchResponder)
def _by_batch_index(resps, key):
    """Responses of a batched request grouped by their ``batch_index`` tag: {row: [output ``key``, ...]}."""
    got: dict = {}
    for o, _ in resps:
        if key in o:
            got.setdefault(int(o["batch_index"].reshape(-1)[0]), []).append(o)
    return got


@pytest.mark.parametrize("streaming", [False, True])
def test_tensorrt_llm_batch_one_result_per_prompt(env, streaming):
    """A request of 3 prompts of different lengths (padded, trimmed by input_lengths, each its own
    request_output_len) returns each prompt's greedy completion, tagged by batch_index, none merged or dropped."""
    prompts, lens = [encode(env, p) for p in PROMPTS[:3]], [12, 20, 7]
    assert len({len(p) for p in prompts}) == 3
    want = [greedy(env.model, p, n, end_ids=(env.end_id,), stop_ids=env.stop_ids) for p, n in zip(prompts, lens)]
    width = max(len(p) for p in prompts)
    stops = rq.to_word_list([[e] for e in env.stop_ids])[None]
    arrays = {"input_ids": np.array([p + [0] * (width - len(p)) for p in prompts], np.int32),
              "input_lengths": np.array([[len(p)] for p in prompts], np.int32),
              "request_output_len": np.array([[n] for n in lens], np.int32),
              "end_id": np.full((3, 1), env.end_id, np.int32), "streaming": np.full((3, 1), streaming, np.bool_),
              "exclude_input_in_output": np.full((3, 1), True, np.bool_),
              "stop_words_list": np.repeat(stops, 3, axis=0)}
    resps = raw_stream(env, "tensorrt_llm", arrays)
    assert [f for _, f in resps].count(True) == 1 and resps[-1][1]  # one final flag, on the last response
    got = _by_batch_index(resps, "output_ids")
    assert sorted(got) == [0, 1, 2]
    ids = {b: sum((o["output_ids"].reshape(-1)[:int(o["sequence_length"].reshape(-1)[0])].tolist() for o in rs), [])
           for b, rs in got.items()}
    assert [ids[b] for b in range(3)] == want
    if not streaming:
        assert all(len(rs) == 1 for rs in got.values())


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["tensorrt_llm_bls", "ensemble"])
def test_text_batch_one_text_per_prompt(env, model, stream):
    """text_input [3, 1] (decoupled): each prompt its own result, tagged by batch_index, one final flag. The
    ensemble's preprocessing pads the prompts into one [3, N] input_ids, tensorrt_llm serves each row,
    postprocessing decodes each response."""
    lens = [10, 24, 6]
    want = [expected(env, p, n) for p, n in zip(PROMPTS[:3], lens)]
    arrays = {"text_input": np.array([[p.encode()] for p in PROMPTS[:3]], dtype=object),
              "max_tokens": np.array([[n] for n in lens], np.int32),
              "stream": np.full((3, 1), stream, np.bool_),
              "exclude_input_in_output": np.full((3, 1), True, np.bool_)}
    resps = raw_stream(env, model, arrays)
    assert [f for _, f in resps].count(True) == 1 and resps[-1][1]
    got = _by_batch_index(resps, "text_output")
    assert sorted(got) == [0, 1, 2]
    text = {b: "".join(o["text_output"].reshape(-1)[0].decode() for o in rs) for b, rs in got.items()}
    if stream and model == "ensemble":  # per-token pieces (triton_repo/README.md), one per generated token
        assert [len(got[b]) for b in range(3)] == [len(ids) for ids, _ in want]
    else:
        assert [text[b] for b in range(3)] == [t for _, t in want]
    if not stream:
        assert all(len(rs) == 1 for rs in got.values())


def test_batch_with_a_bad_prompt_fails_the_whole_request(env):
    arrays = {"text_input": np.array([[b"a"], [b"b"]], dtype=object), "max_tokens": np.array([[4], [0]], np.int32)}
    with pytest.raises(TritonRequestError, match=r"max_tokens must be >= 1, got 0"):
        raw_stream(env, "tensorrt_llm_bls", arrays)
    healthy_after(env)
