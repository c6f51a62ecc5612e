"""The OpenAI-compatible endpoint (`serve --openai-port`) in front of the `reference` repository on a real Triton
server, driven by the official `openai` Python client. Ground truth: the reference model in process
(tests/groundtruth.py) on the HF tokenizer's encoding of the prompt / the chat template's rendering."""
from __future__ import annotations

import json
import re
import time

import pytest
import transformers

from conftest import require, require_triton_server, start_reference_deployment
from groundtruth import greedy, stop_ids

require("tritonclient.grpc")
require("sentencepiece")
require("fastapi")
require("uvicorn")
openai = require("openai")
require_triton_server()

PROMPT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from trtllm_loop.modeling.load import load_model

    d = tmp_path_factory.mktemp("oai")
    ckpt, server, api = start_reference_deployment(d)
    e = type("Env", (), {})()
    e.server, e.api, e.log = server, api, d / "server.log"
    e.client = openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=120)
    e.tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    e.model = load_model(ckpt)
    e.end_id = e.tok.eos_token_id
    e.stop_ids = stop_ids(ckpt, e.end_id)
    yield e
    api.stop()
    assert server.stop() == 0, server.log_tail()


def expected(env, prompt, n):
    ids = greedy(env.model, env.tok.encode(prompt, add_special_tokens=False), n, end_ids=(env.end_id,),
                 stop_ids=env.stop_ids)
    return ids, env.tok.decode(ids, skip_special_tokens=True)


def test_models_and_loopback(env):
    assert env.api.host == "127.0.0.1"
    assert [m.id for m in env.client.models.list().data] == ["tensorrt_llm_bls", "ensemble"]


def test_completions(env):
    ids, text = expected(env, PROMPT, 12)
    r = env.client.completions.create(model="tensorrt_llm_bls", prompt=PROMPT, max_tokens=12)
    assert r.choices[0].text == text
    assert r.usage.prompt_tokens == len(env.tok.encode(PROMPT, add_special_tokens=False))
    assert r.usage.completion_tokens == len(ids)
    assert r.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")
    chunks = list(env.client.completions.create(model="tensorrt_llm_bls", prompt=PROMPT, max_tokens=12, stream=True,
                                                stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == text
    assert chunks[-1].usage.completion_tokens == len(ids)
    # the ensemble serves the same text when not streamed
    assert env.client.completions.create(model="ensemble", prompt=PROMPT, max_tokens=12).choices[0].text == text


def test_chat_completions_use_the_chat_template(env):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "写一个 hello world"}]
    rendered = env.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids, text = expected(env, rendered, 16)
    r = env.client.chat.completions.create(model="tensorrt_llm_bls", messages=msgs, max_tokens=16)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.usage.prompt_tokens == len(env.tok.encode(rendered, add_special_tokens=False))
    stream = env.client.chat.completions.create(model="tensorrt_llm_bls", messages=msgs, max_tokens=16, stream=True)
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(deltas) == text


def test_stop_max_tokens_and_sampling(env):
    ids, text = expected(env, PROMPT, 30)
    word = want = None
    for k in range(2, len(ids) - 2):  # two generated tokens whose text occurs first at their place
        w, prefix = env.tok.decode(ids[k:k + 2]), env.tok.decode(ids[:k], skip_special_tokens=True)
        if w.strip() and "\ufffd" not in w and text.find(w) == len(prefix) \
                and not any(t in env.tok.all_special_ids for t in ids[:k + 2]):
            word, want = w, prefix
            break
    assert word, "no usable stop word in the generated text"
    r = env.client.completions.create(model="tensorrt_llm_bls", prompt=PROMPT, max_tokens=30, stop=[word])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    # OpenAI's text excludes the stop word (Triton's includes it): streamed too
    chunks = env.client.completions.create(model="tensorrt_llm_bls", prompt=PROMPT, max_tokens=30, stop=[word],
                                           stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want
    short = env.client.completions.create(model="tensorrt_llm_bls", prompt=PROMPT, max_tokens=3)
    if len(ids) >= 3:
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    # seeded sampling is reproducible through the endpoint
    kw = dict(model="tensorrt_llm_bls", prompt=PROMPT, max_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    assert env.client.completions.create(**kw).choices[0].text == env.client.completions.create(**kw).choices[0].text


def test_errors_in_openai_shape(env):
    with pytest.raises(openai.BadRequestError) as ei:
        env.client.completions.create(model="tensorrt_llm_bls", prompt=PROMPT, max_tokens=4, top_p=1.5)
    assert "top_p must be in (0, 1]" in str(ei.value)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be >= 1"):
        env.client.chat.completions.create(model="tensorrt_llm_bls", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=0)
    # NaN (which the openai client will not even send): a 400 in OpenAI's error shape, naming the field
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", env.api.port, timeout=60)
    conn.request("POST", "/v1/completions", body=b'{"prompt": "hi", "max_tokens": 4, "temperature": NaN}',
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    err = json.loads(r.read())["error"]
    conn.close()
    assert r.status == 400 and err["param"] == "temperature" and err["type"] == "invalid_request_error"
    assert err["message"] == "temperature must be a finite number, got nan"
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        env.client.completions.create(model="tensorrt_llm_bls", prompt="hi", max_tokens=4, n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        env.client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    # an error inside a stream reaches the client as an error
    with pytest.raises(openai.APIError, match="top_p"):
        list(env.client.completions.create(model="tensorrt_llm_bls", prompt="hi", max_tokens=4, top_p=1.5,
                                           stream=True))
    assert env.client.completions.create(model="tensorrt_llm_bls", prompt="hi", max_tokens=2).choices


def test_cancelled_stream_stops_generation(env):
    before = len(re.findall(r"request 'bls-oai-[^']*' finished \(cancelled\)", env.log.read_text(errors="replace")))
    prompt = next((p for p in (PROMPT, "count", "x", "1 2 3", "The quick brown fox")
                   if len(expected(env, p, 40)[0]) == 40), None)
    assert prompt, "every probe prompt hit an eos token within 40 tokens"
    stream = env.client.completions.create(model="tensorrt_llm_bls", prompt=prompt, max_tokens=200, stream=True)
    got = 0
    for c in stream:
        got += 1
        if got >= 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    pat = r"request 'bls-oai-[^']*' finished \((\w+)\) after (\d+) tokens"
    while time.monotonic() < deadline:
        m = [x for x in re.finditer(pat, env.log.read_text(errors="replace")) if x.group(1) == "cancelled"]
        if len(m) > before:
            break
        time.sleep(0.2)
    assert len(m) > before, "the cancelled stream's tensorrt_llm request was not cancelled"
    assert int(m[-1].group(2)) < 200
