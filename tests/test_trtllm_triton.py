"""Issue 9 item 3 / "What to build" 5: the Triton repository that `trtllm-loop build` writes is served, as a user
would, by `trtllm-loop serve DEPLOY/triton_repo` on the real CPU Triton server (the one bundled with
nvidia-pytriton), with trtllm-loop's API double standing in for TensorRT-LLM under the repository's own `llmapi`
`tensorrt_llm` model (it imports `tensorrt_llm`, which resolves to the double here).

Ground truth is the reference model (tests/groundtruth.py: full forwards of the HF reference, greedy) on the
prompt tokenized by the HF tokenizer, stop ids read here from generation_config.json, decoded by the HF
tokenizer; never the server's output. Every wait is bounded.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import raw_stream, require, require_triton_server
from groundtruth import greedy, stop_ids

require("tritonclient.grpc")
require("sentencepiece")
require_triton_server()

PROMPTS = ["Hello world, 你好 😀 and  two spaces", "def add(a, b):\n    return a + b"]
MAX_TOKENS = 24  # tiny's window is 16: the local window edge is crossed at decode


class Env:
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import transformers

    from trtllm_loop.modeling.load import load_model
    from trtllm_loop.serving.server import free_port
    from trtllm_loop.synth import synthesize
    from trtllm_loop.trtllm.verify import VERIFY_BUILD

    d = tmp_path_factory.mktemp("deploy-triton")
    ckpt = synthesize(d / "tiny", "tiny", seed=3, dtype="float32")
    bc = dict(VERIFY_BUILD, max_num_tokens=256)
    (d / "bc.yaml").write_text(yaml.safe_dump(bc))
    env = {k: v for k, v in os.environ.items() if k != "TRTLLM_WINDOW_SIZE_SHARES"}
    r = subprocess.run([sys.executable, "-m", "trtllm_loop.cli", "build", str(ckpt), "--config", str(d / "bc.yaml"),
                        "--out", str(d / "deploy")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"trtllm-loop serve {d / 'deploy'}/triton_repo" in r.stdout
    e = Env()
    e.deploy, e.log = d / "deploy", d / "server.log"
    e.http, e.grpc_port, metrics = free_port(), free_port(), free_port()
    e.grpc = f"127.0.0.1:{e.grpc_port}"
    e.proc = subprocess.Popen(
        [sys.executable, "-m", "trtllm_loop.cli", "serve", str(e.deploy / "triton_repo"), "--http-port", str(e.http),
         "--grpc-port", str(e.grpc_port), "--metrics-port", str(metrics), "--log", str(e.log)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**env, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = e.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        log = e.log.read_text(errors="replace") if e.log.exists() else ""
        assert "Ctrl-C to stop" in "".join(lines), "".join(lines) + log[-6000:]
        e.tok = transformers.AutoTokenizer.from_pretrained(e.deploy)
        e.model = load_model(ckpt)
        e.end_id = e.tok.eos_token_id
        e.stop_ids = stop_ids(ckpt, e.end_id)
        yield e
    finally:
        if e.proc.poll() is None:
            e.proc.send_signal(signal.SIGINT)
            try:
                rest, _ = e.proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                e.proc.kill()
                rest, _ = e.proc.communicate()
            lines.append(rest)
    assert e.proc.returncode == 0, "".join(lines)


def expected(env, prompt, max_tokens=MAX_TOKENS):
    ids = greedy(env.model, env.tok.encode(prompt, add_special_tokens=False), max_tokens, end_ids=(env.end_id,),
                 stop_ids=env.stop_ids)
    return ids, env.tok.decode(ids, skip_special_tokens=True)




def llm_arrays(ids, max_tokens, end_id, streaming=True):
    return {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
            "request_output_len": np.array([[max_tokens]], np.int32), "end_id": np.array([[end_id]], np.int32),
            "streaming": np.array([[streaming]], np.bool_), "exclude_input_in_output": np.array([[True]], np.bool_)}


def finished(env, request_id, timeout=30):
    pat = re.compile(rf"request '{re.escape(request_id)}' finished \((\w+)\) after (\d+) tokens")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pat.search(env.log.read_text(errors="replace"))
        if m:
            return m.group(1), int(m.group(2))
        time.sleep(0.2)
    raise AssertionError(f"no finish line for {request_id!r} in the server log")


# ----------------------------------------------------------------------------- tests
def test_the_llmapi_model_runs_on_the_api_double(env):
    log = env.log.read_text(errors="replace")
    assert "serving with trtllm-loop's API double" in log  # the repository's llmapi model, not reference
    assert "tensorrt_llm.LLM" in (env.deploy / "triton_repo/tensorrt_llm/1/model.py").read_text()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_in_streamed_text_out_equals_the_reference(env, prompt):
    from trtllm_loop.serving.client import grpc_stream, request_fields

    ids, text = expected(env, prompt)
    n_prompt = len(env.tok.encode(prompt, add_special_tokens=False))
    assert len(ids) >= 8 and text and n_prompt + len(ids) > 16  # decode steps beyond the 16-token window
    pieces = list(grpc_stream(env.grpc, "tensorrt_llm_bls", request_fields(prompt, MAX_TOKENS), stream=True))
    assert len(pieces) > 1 and "".join(pieces) == text
    whole = list(grpc_stream(env.grpc, "ensemble", request_fields(prompt, MAX_TOKENS), stream=False))
    assert "".join(whole) == text


def test_direct_token_stream_equals_the_reference(env):
    ids, _ = expected(env, PROMPTS[1])
    prompt = env.tok.encode(PROMPTS[1], add_special_tokens=False)
    stops = [[t] for t in env.stop_ids]
    from trtllm_loop.serving import contract as rq

    arrays = dict(llm_arrays(prompt, MAX_TOKENS, env.end_id), stop_words_list=rq.to_word_list(stops)[None])
    got = [o["output_ids"].reshape(-1).tolist() for o, _ in raw_stream(env, "tensorrt_llm", arrays, "direct-1")
           if "output_ids" in o]
    assert [t for piece in got for t in piece] == ids and len(got) == len(ids)  # one response per token


def test_client_cancellation_stops_generation(env):
    prompt = env.tok.encode(PROMPTS[0], add_special_tokens=False)
    got = raw_stream(env, "tensorrt_llm", llm_arrays(prompt, 400, -1), request_id="cancel-llmapi", cancel_after=3)
    assert len(got) == 3 and not got[-1][1]
    reason, n = finished(env, "cancel-llmapi")
    assert reason == "cancelled" and 3 <= n < 400
    from trtllm_loop.serving.client import grpc_generate, request_fields
    assert grpc_generate(env.grpc, "tensorrt_llm_bls", request_fields("ok", 2), stream=False) is not None


def test_stop_request_ends_generation(env):
    """TRT-LLM's cancel request: ``stop=true`` with the id of a running request (what BLS sends), sent once the
    first token has streamed."""
    import tritonclient.grpc as grpcclient

    prompt = env.tok.encode(PROMPTS[0], add_special_tokens=False)
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(env.grpc)
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    inputs = []
    for name, arr in llm_arrays(prompt, 400, -1).items():
        t = grpcclient.InferInput(name, list(arr.shape), {np.int32: "INT32", np.bool_: "BOOL"}[arr.dtype.type])
        t.set_data_from_numpy(arr)
        inputs.append(t)
    c.async_stream_infer("tensorrt_llm", inputs, request_id="stop-llmapi", enable_empty_final_response=True)
    try:
        result, error = q.get(timeout=120)
        assert error is None and "output_ids" in {o.name for o in result.get_response().outputs}
        stop = dict(llm_arrays([0], 1, -1, streaming=False), stop=np.array([[True]], np.bool_))
        assert raw_stream(env, "tensorrt_llm", stop, request_id="stop-llmapi")[-1][1]  # answered: final, no error
        n_resp = 1
        while True:
            result, error = q.get(timeout=120)
            assert error is None, error
            n_resp += 1
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        c.stop_stream()
        c.close()
    reason, n = finished(env, "stop-llmapi")
    assert reason == "cancelled" and n < 400 and n_resp < 400


def test_a_batch_of_two_prompts_gives_two_results_never_flattened(env):
    """input_ids [2, N] (different lengths, padded): each prompt its own result, tagged by batch_index."""
    prompts = [env.tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    want = [greedy(env.model, p, 6, end_ids=(env.end_id,), stop_ids=env.stop_ids) for p in prompts]
    width = max(map(len, prompts))
    arrays = llm_arrays(prompts[0], 6, env.end_id, streaming=False)
    arrays["input_ids"] = np.array([p + [0] * (width - len(p)) for p in prompts], np.int32)
    arrays["input_lengths"] = np.array([[len(p)] for p in prompts], np.int32)
    for k in ("request_output_len", "end_id", "streaming", "exclude_input_in_output"):
        arrays[k] = np.repeat(arrays[k], 2, axis=0)
    resps = raw_stream(env, "tensorrt_llm", arrays)
    got = {int(o["batch_index"].reshape(-1)[0]): o["output_ids"].reshape(-1)[:int(o["sequence_length"].reshape(-1)[0])]
           .tolist() for o, _ in resps if "output_ids" in o}
    assert got == {0: want[0], 1: want[1]} and [f for _, f in resps].count(True) == 1


# ----------------------------------------------------------------------------- upstream's LLM-API contract
def llmapi_arrays(prompts, max_tokens, streaming=False, **extra):
    """A request of upstream's LLM-API contract (all_models/llmapi/tensorrt_llm/config.pbtxt), batch = prompts."""
    n = len(prompts)
    arrays = {"text_input": np.array([[p.encode()] for p in prompts], dtype=object),
              "sampling_param_max_tokens": np.full((n, 1), max_tokens, np.int32),
              "streaming": np.full((n, 1), streaming, np.bool_),
              "sampling_param_exclude_input_from_output": np.full((n, 1), True, np.bool_),
              "return_finish_reason": np.full((n, 1), True, np.bool_),
              "return_stop_reason": np.full((n, 1), True, np.bool_)}
    arrays.update(extra)
    return arrays


def texts(resps):
    return [o["text_output"].reshape(-1)[0].decode() for o, _ in resps if "text_output" in o]


def reason_of(env, ids, max_tokens=MAX_TOKENS):
    """(finish_reason, stop_reason) the LLM API gives for the reference's ``ids``."""
    if ids and ids[-1] in env.stop_ids:
        return b"stop", str(ids[-1]).encode()
    return (b"length", b"None") if len(ids) == max_tokens else (b"stop", b"None")  # max_tokens, or end_id


def test_llmapi_contract_text_in_text_out(env):
    ids, text = expected(env, PROMPTS[1])
    resps = raw_stream(env, "tensorrt_llm", llmapi_arrays([PROMPTS[1]], MAX_TOKENS))
    assert texts(resps) == [text] and resps[-1][1]
    o = resps[-1][0]
    assert (o["finish_reason"].reshape(-1)[0], o["stop_reason"].reshape(-1)[0]) == reason_of(env, ids)
    # upstream's default: sampling_param_exclude_input_from_output false -> the prompt is echoed
    echo = llmapi_arrays([PROMPTS[1]], MAX_TOKENS)
    del echo["sampling_param_exclude_input_from_output"]
    assert texts(raw_stream(env, "tensorrt_llm", echo)) == [PROMPTS[1] + text]


def test_llmapi_contract_streaming_is_the_text_so_far(env):
    ids, text = expected(env, PROMPTS[0])
    resps = raw_stream(env, "tensorrt_llm", llmapi_arrays([PROMPTS[0]], MAX_TOKENS, streaming=True))
    got = texts(resps)
    assert len(got) > 3 and got[-1] == text and resps[-1][1]
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(got[:-1], got[1:-1]))  # cumulative, growing
    assert got[-1].startswith(got[-2])  # the final response: the whole text, as upstream's
    reasons = [o["finish_reason"].reshape(-1)[0] for o, _ in resps if "finish_reason" in o]
    assert reasons[-1] == reason_of(env, ids)[0] and set(reasons[:-1]) == {b"None"}


def test_llmapi_contract_stop_string_and_batch(env):
    from trtllm_loop.serving.textproc import cut_at_stop

    _, text = expected(env, PROMPTS[0])
    i = next(i for i in range(4, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    word = text[i:i + 3]  # a stop string in the middle of the answer
    want, hit = cut_at_stop(text, [word])
    assert hit and len(want) < len(text)
    _, text0 = expected(env, PROMPTS[1], 8)
    arrays = llmapi_arrays([PROMPTS[1], PROMPTS[0]], MAX_TOKENS,
                           sampling_param_stop=np.array([[b""], [word.encode()]], dtype=object))
    arrays["sampling_param_max_tokens"] = np.array([[8], [MAX_TOKENS]], np.int32)
    resps = raw_stream(env, "tensorrt_llm", arrays)
    got = {int(o["batch_index"].reshape(-1)[0]): o for o, _ in resps if "text_output" in o}
    assert got[0]["text_output"].reshape(-1)[0].decode() == text0
    assert got[1]["text_output"].reshape(-1)[0].decode() == want  # the stop word ends the text, included
    assert got[1]["finish_reason"].reshape(-1)[0] == b"stop" and got[1]["stop_reason"].reshape(-1)[0] == word.encode()


@pytest.mark.parametrize("extra,msg", [
    ({"sampling_param_temperature": np.array([[np.nan]], np.float32)}, "sampling_param_temperature must be >= 0"),
    ({"sampling_param_best_of": np.array([[2]], np.int32)}, "sampling_param_best_of=2 is not supported"),
    ({"sampling_param_max_tokens": np.array([[0]], np.int32)}, "sampling_param_max_tokens must be >= 1"),
    ({"return_cumulative_logprob": np.array([[True]])}, "return_cumulative_logprob is not supported"),
    ({"input_ids": np.array([[5]], np.int32)}, "text_input and input_ids are both set")])
def test_llmapi_contract_refusals_name_upstream_fields(env, extra, msg):
    from trtllm_loop.serving.client import TritonRequestError

    with pytest.raises(TritonRequestError, match=msg) as e:
        raw_stream(env, "tensorrt_llm", llmapi_arrays(["hi"], 4, **extra))
    assert "Traceback" not in str(e.value)


def test_llmapi_stop_before_the_first_token_is_kept(env):
    """Upstream polls cancellation every cancellation_check_period_ms; here a ``stop`` that arrives while the
    request is still queued (the LLM busy with another one) ends it with no token."""
    import tritonclient.grpc as grpcclient

    prompt = env.tok.encode(PROMPTS[0], add_special_tokens=False)
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(env.grpc)
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        for rid in ("busy-first", "queued-second"):  # the double runs one request at a time
            inputs = []
            for name, arr in llm_arrays(prompt, 300, -1).items():
                t = grpcclient.InferInput(name, list(arr.shape), {np.int32: "INT32", np.bool_: "BOOL"}[arr.dtype.type])
                t.set_data_from_numpy(arr)
                inputs.append(t)
            c.async_stream_infer("tensorrt_llm", inputs, request_id=rid, enable_empty_final_response=True)
        result, error = q.get(timeout=120)  # the first request is generating
        assert error is None
        stop = dict(llm_arrays([0], 1, -1, streaming=False), stop=np.array([[True]], np.bool_))
        for rid in ("queued-second", "busy-first"):
            assert raw_stream(env, "tensorrt_llm", stop, request_id=rid)[-1][1]
    finally:
        c.stop_stream()
        c.close()
    assert finished(env, "queued-second") == ("cancelled", 0)
    reason, n = finished(env, "busy-first")
    assert reason == "cancelled" and n < 300
