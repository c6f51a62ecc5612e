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

from conftest import require

from trtllm_loop.serving import contract as rq


class _Tensor:
    def __init__(self, name, arr):
        self._name, self._arr = name, np.asarray(arr)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._arr


class _Error:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, msg, code="INTERNAL"):
        self._msg, self.code = msg, code

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
    m.logged = []
    m.Logger = types.SimpleNamespace(**{f"log_{k}": (lambda k: lambda msg: m.logged.append((k, msg)))(k)
                                        for k in ("info", "warn", "error", "verbose")})
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


# ----------------------------------------------------------------------------- one bad request fails alone
def _load(name, tmp_path, monkeypatch):
    """A model source as the Python backend loads it (``1/model.py``), with the stand-in pb_utils."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _pb_utils())
    from trtllm_loop.serving.render import MODELS_SRC

    d = tmp_path / name / "1"
    d.mkdir(parents=True)
    (d / "model.py").write_text((MODELS_SRC / f"{name}.py").read_text())
    spec = importlib.util.spec_from_file_location(f"{name}_model_under_test", d / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.TritonPythonModel()


def _params(decoupled=True, **kw):
    return {"model_config": json.dumps({"parameters": {k: {"string_value": str(v)} for k, v in kw.items()},
                                        "model_transaction_policy": {"decoupled": decoupled}})}


def _error_of(sent):
    (resp, flags), = sent
    assert flags == 1 and resp.error is not None, sent
    return resp.error.message()


BAD_LLM = [  # (extra inputs, message): each fails alone
    (dict(input_lengths=np.array([[4]], np.int32)), "input_lengths=4 but input_ids has 3 ids: send 1..3"),
    (dict(temperature=np.array([[np.nan]], np.float32)), "temperature must be >= 0 (0 = greedy), got nan"),
    (dict(runtime_top_p=np.array([[1.5]], np.float32)), "runtime_top_p must be in (0, 1] (1 = off), got 1.5"),
    (dict(input_ids=np.array([[5, 6.5, 7]], np.float32)), "input_ids must be a tensor of INT32, got float32"),
    (dict(input_ids=np.array([[5, 900, 7]], np.int32)), "input_ids contains 900, outside the vocabulary [0, 512)"),
    (dict(beam_width=np.array([[2]], np.int32)), "beam_width=2 is not supported by the reference runtime"),
    (dict(end_id=np.array([[1, 2]], np.int32)), "end_id must hold one value per prompt"),
]


def test_reference_model_one_bad_request_fails_alone(tiny_ckpt, tmp_path, monkeypatch):
    from groundtruth import greedy
    from trtllm_loop.modeling.load import load_model

    model = _load("reference", tmp_path, monkeypatch)
    model.initialize(_params(checkpoint_dir=tiny_ckpt, max_seq_len=64, tokens_per_block=4))
    try:
        good = [_Request(_req([5, 6, 7], 6, end_id=np.array([[-1]], np.int32))),
                _Request(_req([9, 8], 5, end_id=np.array([[-1]], np.int32),
                              exclude_input_in_output=np.array([[True]])))]
        bad = [_Request(_req([5, 6, 7], 6, **extra)) for extra, _ in BAD_LLM]
        model.execute([good[0], *bad, good[1]])
        for r, (_, msg) in zip(bad, BAD_LLM):
            assert msg in _error_of(r.sender.sent)
        ref = load_model(tiny_ckpt)
        got = [_wait_final(r.sender) for r in good]
        assert [_ids(s[-1][0]) for s in got] == [[5, 6, 7] + greedy(ref, [5, 6, 7], 6), greedy(ref, [9, 8], 5)]
    finally:
        model.finalize()


def test_llmapi_model_one_bad_request_fails_alone(llmapi_model):
    good = [_Request(_req([1, 2])), _Request(_req([3]))]
    bad = [_Request(_req([1, 2], input_lengths=np.array([[3]], np.int32))),  # used to be sliced silently
           _Request(_req([1], temperature=np.array([[-1.0]], np.float32))),
           _Request(_req([1], return_log_probs=np.array([[True]]))),
           _Request(_req([1], input_ids=np.array([[1], [2]], np.int32)))]     # a batch: one length per prompt
    llmapi_model.execute([good[0], *bad, good[1]])
    assert "input_lengths=3 but input_ids has 2 ids" in _error_of(bad[0].sender.sent)
    assert "temperature must be >= 0 (0 = greedy), got -1" in _error_of(bad[1].sender.sent)
    assert "return_log_probs is not supported by the llmapi tensorrt_llm model" in _error_of(bad[2].sender.sent)
    assert "input_lengths must hold one value per prompt (shape [2, 1]), got shape [1, 1]" in \
        _error_of(bad[3].sender.sent)
    assert [_ids(_wait_final(r.sender)[-1][0]) for r in good] == [[1, 2, 7, 8, 9, 10, 11], [3, 7, 8, 9, 10, 11]]
    # the sampling options the LLM API receives are the request's, by their LLM-API names
    r = _Request(_req([1], runtime_top_k=np.array([[4]], np.int32), len_penalty=np.array([[1.5]], np.float32),
                      beam_width=np.array([[1]], np.int32)))
    llmapi_model.execute([r])
    _wait_final(r.sender)
    _, sp, _ = _FakeLLM.instances[-1].calls[-1]
    assert sp.top_k == 4 and sp.length_penalty == 1.5 and not hasattr(sp, "beam_width")


def test_preprocessing_one_bad_request_fails_alone(tmp_path, monkeypatch):
    require("sentencepiece")
    import transformers

    from trtllm_loop.synth import synthesize

    ckpt = synthesize(tmp_path / "tiny", "tiny", dtype="float32")
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = _load("preprocessing", tmp_path, monkeypatch)
    model.initialize(_params(tokenizer_dir=ckpt, max_input_len=16, max_output_len=32))
    q = lambda *s: np.array([[x.encode()] for x in s], dtype=object)  # noqa: E731
    n = lambda *v: np.array([[x] for x in v], np.int32)  # noqa: E731
    reqs = [_Request({"QUERY": q("hello world", "hi"), "REQUEST_OUTPUT_LEN": n(4, 5),
                      "STOP_WORDS_DICT": np.array([[b"world", b""], [b"", b""]], dtype=object)}),
            _Request({"QUERY": q("hi"), "REQUEST_OUTPUT_LEN": n(0)}),
            _Request({"QUERY": q("word " * 40), "REQUEST_OUTPUT_LEN": n(4)}),
            _Request({"QUERY": q("hi"), "REQUEST_OUTPUT_LEN": np.array([[4.0]], np.float32)}),
            _Request({"QUERY": q("x")})]
    out = model.execute(reqs)
    assert len(out) == 5 and out[0].error is None
    assert [e.error.message() for e in out[1:]] == [
        "max_tokens must be >= 1, got 0: ask for at least one token",
        f"the prompt is {len(tok.encode('word ' * 40, add_special_tokens=False))} tokens long; this server accepts "
        "at most 16 (max_input_len): shorten text_input",
        "max_tokens must be a tensor of INT32, got float32",
        "max_tokens is missing: send the maximum number of tokens to generate (>= 1)"]
    t = {x.name(): x.as_numpy() for x in out[0].output_tensors}
    a, b = tok.encode("hello world", add_special_tokens=False), tok.encode("hi", add_special_tokens=False)
    assert t["REQUEST_INPUT_LEN"].tolist() == [[len(a)], [len(b)]]
    assert t["INPUT_ID"][0, :len(a)].tolist() == a and t["INPUT_ID"][1, :len(b)].tolist() == b
    assert t["REQUEST_OUTPUT_LEN"].tolist() == [[4], [5]]
    assert t["OUT_END_ID"].tolist() == [[tok.eos_token_id]] * 2
    stops = [rq.from_word_list(t["STOP_WORDS_IDS"][i]) for i in range(2)]
    eos = json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"]
    others = [[e] for e in eos if e != tok.eos_token_id]
    assert stops == [[tok.encode("world", add_special_tokens=False)] + others, others]


def test_reference_engine_failure_fails_only_its_request(tiny_ckpt, tmp_path, monkeypatch):
    """A step that raises for one request (here: sampling with a marker top_k) fails that request alone, with a
    one-line error and the trace in the log; the requests batched with it finish exactly as the reference model
    says, streamed or not, and the model keeps serving."""
    from groundtruth import greedy
    from trtllm_loop.modeling.load import load_model
    from trtllm_loop.runtime import scheduler

    real = scheduler.sample

    def sample(logits, params, gen):
        if params.top_k == 13:
            raise RuntimeError("boom inside the engine")
        return real(logits, params, gen)

    monkeypatch.setattr(scheduler, "sample", sample)
    model = _load("reference", tmp_path, monkeypatch)
    pb = sys.modules["triton_python_backend_utils"]
    model.initialize(_params(checkpoint_dir=tiny_ckpt, max_seq_len=64, tokens_per_block=4))
    try:
        no_end = dict(end_id=np.array([[-1]], np.int32))
        good = [_Request(_req([5, 6, 7], 8, **no_end, exclude_input_in_output=np.array([[True]]))),
                _Request(_req([9, 8], 6, **no_end, streaming=np.array([[True]]))),
                _Request(_req([3, 4, 5, 6], 5, **no_end, exclude_input_in_output=np.array([[True]])))]
        bad = _Request(_req([7, 7], 6, **no_end, runtime_top_k=np.array([[13]], np.int32)))
        model.execute([good[0], good[1], bad, good[2]])
        ref = load_model(tiny_ckpt)
        outs = [_wait_final(r.sender, timeout=30) for r in good]
        assert _ids(outs[0][-1][0]) == greedy(ref, [5, 6, 7], 8)
        assert sum((_ids(resp) for resp, _ in outs[1] if resp is not None), []) == greedy(ref, [9, 8], 6)
        assert _ids(outs[2][-1][0]) == greedy(ref, [3, 4, 5, 6], 5)
        msg = _error_of(_wait_final(bad.sender, timeout=30))
        assert msg == ("tensorrt_llm: internal error (RuntimeError: boom inside the engine); the server log has "
                       "the details")
        assert any(k == "error" and "Traceback" in m and "boom inside the engine" in m for k, m in pb.logged)
        # still serving
        again = _Request(_req([5, 6, 7], 8, **no_end, exclude_input_in_output=np.array([[True]])))
        model.execute([again])
        assert _ids(_wait_final(again.sender, timeout=30)[-1][0]) == greedy(ref, [5, 6, 7], 8)
    finally:
        model.finalize()


def test_reference_non_decoupled_refuses_streaming(tiny_ckpt, tmp_path, monkeypatch):
    model = _load("reference", tmp_path, monkeypatch)
    model.initialize(_params(decoupled=False, checkpoint_dir=tiny_ckpt, max_seq_len=64, tokens_per_block=4))
    try:
        r = _Request(_req([5, 6, 7], 4, streaming=np.array([[True]])))
        stop = _Request({"input_ids": np.array([[0]], np.int32), "stop": np.array([[True]])}, request_id="x")
        ok = _Request(_req([5, 6, 7], 4, end_id=np.array([[-1]], np.int32)))
        model.execute([r, stop, ok])
        assert "streaming=true needs the decoupled tensorrt_llm model" in _error_of(r.sender.sent)
        assert r.sender.sent[0][0].error.code == "INVALID_ARG"
        (resp, flags), = _wait_final(stop.sender)  # one response with the final flag, as non-decoupled needs
        assert resp is not None and _ids(resp) == []
        (resp, flags), = _wait_final(ok.sender, timeout=30)
        assert len(_ids(resp)) == 3 + 4
    finally:
        model.finalize()
