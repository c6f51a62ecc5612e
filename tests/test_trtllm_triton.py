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


def test_a_batch_of_two_prompts_is_refused_not_flattened(env):
    from trtllm_loop.serving.client import TritonRequestError

    arrays = llm_arrays([5, 6, 7], 4, env.end_id)
    arrays["input_ids"] = np.array([[5, 6, 7], [8, 9, 10]], np.int32)
    arrays["input_lengths"] = np.array([[3], [3]], np.int32)
    for k in ("request_output_len", "end_id", "streaming", "exclude_input_in_output"):
        arrays[k] = np.repeat(arrays[k], 2, axis=0)
    with pytest.raises(TritonRequestError, match=r"batch of 2 prompts in one request") as e:
        raw_stream(env, "tensorrt_llm", arrays)
    assert "Traceback" not in str(e.value)
