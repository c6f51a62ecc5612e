"""The Triton Python models' code paths that the CPU server cannot reach: the `llmapi` tensorrt_llm model
(needs TensorRT-LLM + GPU) run here against a fake `tensorrt_llm.LLM` and a stand-in for
`triton_python_backend_utils` (the way NVIDIA's own backend unit tests mock it)."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
import types

import numpy as np
import pytest

from trtllm_loop.serving import contract as rq


class _Tensor:
    def __init__(self, name, arr):
        self._name, self._arr = name, np.asarray(arr)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._arr


class _Error:
    def __init__(self, msg):
        self._msg = msg

    def message(self):
        return self._msg


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors or [], error


class _Sender:
    def __init__(self):
        self.sent, self.cancelled = [], False

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))

    def is_cancelled(self):
        return self.cancelled


class _Request:
    def __init__(self, inputs: dict, request_id=""):
        self.inputs, self.rid, self.sender = inputs, request_id, _Sender()

    def request_id(self):
        return self.rid

    def get_response_sender(self):
        return self.sender


def _pb_utils():
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.TritonError, m.InferenceResponse = _Tensor, _Error, _Response
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    m.get_input_tensor_by_name = lambda r, n: _Tensor(n, r.inputs[n]) if n in r.inputs else None
    m.Logger = types.SimpleNamespace(log_info=lambda msg: None)
    return m


class _Out:
    def __init__(self, ids):
        self.outputs = [types.SimpleNamespace(token_ids=list(ids))]


class _Result:
    """Async iterator of cumulative outputs, like tensorrt_llm's RequestOutput with streaming=True."""

    def __init__(self, tokens, streaming):
        self.tokens, self.streaming, self.aborted = tokens, streaming, False

    def abort(self):
        self.aborted = True

    def __aiter__(self):
        async def gen():
            if not self.streaming:
                yield _Out(self.tokens)
                return
            for i in range(1, len(self.tokens) + 1):
                if self.aborted:
                    return
                await asyncio.sleep(0.02)
                yield _Out(self.tokens[:i])
        return gen()


class _FakeLLM:
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        _FakeLLM.instances.append(self)

    def generate_async(self, prompt, sp, streaming=False):
        self.calls.append((prompt, sp, streaming))
        r = _Result([7, 8, 9, 10, 11, sp.end_id if sp.end_id is not None else 2], streaming)
        self.last = r
        return r

    def shutdown(self):
        pass


@pytest.fixture
def llmapi_model(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _pb_utils())
    trt = types.ModuleType("tensorrt_llm")
    trt.LLM = _FakeLLM
    trt.SamplingParams = lambda **kw: types.SimpleNamespace(**{"end_id": None, **kw})
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = lambda **kw: ("kv", kw)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", trt)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    reg = types.ModuleType("fake_register")
    monkeypatch.setitem(sys.modules, "fake_register", reg)
    from trtllm_loop.serving.render import MODELS_SRC

    d = tmp_path / "1"
    d.mkdir()
    (d / "model.py").write_text((MODELS_SRC / "llmapi.py").read_text())
    (d / "model.yaml").write_text("model: /m\nbackend: pytorch\nkv_cache_config:\n  free_gpu_memory_fraction: 0.5\n"
                                  "triton_config:\n  decoupled: true\n  register_module: fake_register\n")
    spec = importlib.util.spec_from_file_location("llmapi_model_under_test", d / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"parameters": {"llm_config": {"string_value": "model.yaml"}}})})
    yield model
    model.finalize()


def _wait_final(sender, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sender.sent and sender.sent[-1][1] == 1:
            return sender.sent
        time.sleep(0.01)
    raise AssertionError(f"no final response: {sender.sent}")


def _ids(resp):
    t = {x.name(): x.as_numpy() for x in resp.output_tensors}
    return t["output_ids"].reshape(-1)[:int(t["sequence_length"].reshape(-1)[0])].tolist()


def _req(ids, max_tokens=8, **extra):
    inputs = {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
              "request_output_len": np.array([[max_tokens]], np.int32), "end_id": np.array([[99]], np.int32)}
    inputs.update(extra)
    return inputs


def test_llmapi_model_builds_llm_from_yaml(llmapi_model):
    llm = _FakeLLM.instances[-1]
    assert llm.kwargs["model"] == "/m" and llm.kwargs["backend"] == "pytorch"
    assert llm.kwargs["kv_cache_config"] == ("kv", {"free_gpu_memory_fraction": 0.5})
    assert "triton_config" not in llm.kwargs


def test_llmapi_non_streaming_and_streaming(llmapi_model):
    r = _Request(_req([1, 2, 3]))
    llmapi_model.execute([r])
    sent = _wait_final(r.sender)
    assert len(sent) == 1 and _ids(sent[0][0]) == [1, 2, 3, 7, 8, 9, 10, 11]  # prompt echoed, end_id dropped
    prompt, sp, streaming = _FakeLLM.instances[-1].calls[-1]
    assert prompt == {"prompt_token_ids": [1, 2, 3]} and sp.max_tokens == 8 and sp.end_id == 99 and not streaming
    r = _Request(_req([1, 2, 3], streaming=np.array([[True]]), exclude_input_in_output=np.array([[True]])))
    llmapi_model.execute([r])
    sent = _wait_final(r.sender)
    pieces = [_ids(resp) for resp, _ in sent if resp is not None]
    assert pieces == [[7], [8], [9], [10], [11]] and sent[-1] == (None, 1)


def test_llmapi_stop_sequences_and_errors(llmapi_model):
    stops = rq.to_word_list([[8, 9], [42]])[None]
    r = _Request(_req([1], stop_words_list=stops, streaming=np.array([[True]])))
    llmapi_model.execute([r])
    sent = _wait_final(r.sender)
    assert [_ids(resp) for resp, _ in sent if resp is not None] == [[7], [8], [9]]
    _, sp, _ = _FakeLLM.instances[-1].calls[-1]
    assert sp.stop_token_ids == [42]
    assert _FakeLLM.instances[-1].last.aborted
    bad = _Request(_req([1], max_tokens=0))
    llmapi_model.execute([bad])
    (resp, flags), = bad.sender.sent
    assert flags == 1 and "request_output_len must be >= 1" in resp.error.message()


def test_llmapi_cancel_by_stop_request(llmapi_model):
    r = _Request(_req([1], max_tokens=8, streaming=np.array([[True]])), request_id="abc")
    llmapi_model.execute([r])
    deadline = time.monotonic() + 5
    while "abc" not in llmapi_model.by_id and time.monotonic() < deadline:
        time.sleep(0.001)
    stop = _Request(_req([0], max_tokens=1, stop=np.array([[True]])), request_id="abc")
    llmapi_model.execute([stop])
    assert stop.sender.sent == [(None, 1)]
    sent = _wait_final(r.sender)
    assert len([s for s, _ in sent if s is not None]) < 5
