"""Isolation and transaction policy on a real Triton server (issue 10, items 3 and 7):

* ``tensorrt_llm_bls`` ends every request within a bounded time whatever `tensorrt_llm` does: a stand-in
  `tensorrt_llm` (written here, behind the rendered ensemble/BLS/pre/postprocessing) that never answers, answers
  with an error, or raises; the BLS gives each request an error within ``response_timeout_s``, holds no worker for
  a hung call, and keeps serving;
* ``--decoupled false``: unary ``infer`` over gRPC and HTTP on ``ensemble``, ``tensorrt_llm_bls`` and
  ``tensorrt_llm`` of the reference flavour, checked against the reference model (tests/groundtruth.py).
"""
from __future__ import annotations

import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import transformers

from conftest import require, require_triton_server
from groundtruth import greedy, stop_ids

require("tritonclient.grpc")
require("sentencepiece")
require_triton_server()

from trtllm_loop.serving.client import TritonRequestError, grpc_generate, grpc_stream, http_generate  # noqa: E402
from trtllm_loop.serving.client import request_fields  # noqa: E402

TIMEOUT_S = 2
# BLS workers of the stand-in repository: few, so that a handful of hung calls exhausts them (the point of the test)
WORKERS = 4
HANG, ERROR, RAISE = 7, 8, 9  # max_tokens values the stand-in tensorrt_llm reacts to
STANDIN_IDS = [5, 6, 7]

STANDIN = textwrap.dedent('''
    """Stand-in tensorrt_llm: max_tokens 7 -> never answers (until a stop request, or 20 s), 8 -> an error
    response, 9 -> execute() raises, anything else -> streams ids 5, 6, 7."""
    import threading
    import time

    import numpy as np
    import triton_python_backend_utils as pb_utils

    FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


    def ids(v):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("output_ids", np.array([[v]], np.int32)),
            pb_utils.Tensor("sequence_length", np.array([[len(v)]], np.int32))])


    class TritonPythonModel:
        def initialize(self, args):
            self.hung = {}
            self.lock = threading.Lock()

        def _release(self, rid):
            with self.lock:
                s = self.hung.pop(rid, None)
            if s is not None:
                s.send(flags=FINAL)

        def execute(self, requests):
            for r in requests:
                s = r.get_response_sender()
                stop = pb_utils.get_input_tensor_by_name(r, "stop")
                if stop is not None and bool(stop.as_numpy().reshape(-1)[0]):
                    self._release(r.request_id())
                    s.send(flags=FINAL)
                    continue
                n = int(pb_utils.get_input_tensor_by_name(r, "request_output_len").as_numpy().reshape(-1)[0])
                if n == 7:
                    with self.lock:
                        self.hung[r.request_id()] = s
                    threading.Timer(20, self._release, (r.request_id(),)).start()
                elif n == 8:
                    s.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("stand-in engine error")),
                           flags=FINAL)
                elif n == 9:
                    raise RuntimeError("stand-in execute raised")
                else:
                    for t in [5, 6, 7]:
                        s.send(ids([t]))
                    s.send(flags=FINAL)
            return None

        def finalize(self):
            for rid in list(self.hung):
                self._release(rid)
''')


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from trtllm_loop.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("iso") / "tiny", "tiny", dtype="float32")


@pytest.fixture(scope="module")
def standin(ckpt, tmp_path_factory):
    from trtllm_loop.serving.render import render_repository
    from trtllm_loop.serving.server import TritonServer

    d = tmp_path_factory.mktemp("standin")
    repo = render_repository("reference", ckpt, d / "repo", max_seq_len=64, bls_max_concurrency=WORKERS,
                             bls_response_timeout_s=TIMEOUT_S)
    (repo / "tensorrt_llm" / "1" / "model.py").write_text(STANDIN)
    server = TritonServer(repo, log_path=d / "server.log", exit_timeout=30).start(timeout=300)
    yield server
    server.stop()


def _bls(server, max_tokens, stream=True):
    return "".join(grpc_stream(server.grpc_url, "tensorrt_llm_bls", request_fields("hello", max_tokens),
                               stream=stream, timeout=60))


def test_bls_ends_every_request_in_bounded_time(standin, ckpt):
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    want = tok.decode(STANDIN_IDS, skip_special_tokens=True)
    assert _bls(standin, 4) == want
    t0 = time.monotonic()
    # more hung requests than the BLS has workers, plus good ones in between
    with ThreadPoolExecutor(2 * WORKERS + 2) as ex:
        hung = [ex.submit(_bls, standin, HANG, bool(i % 2)) for i in range(WORKERS + 2)]
        good = [ex.submit(_bls, standin, 4) for _ in range(3)]
        for f in hung:
            with pytest.raises(TritonRequestError, match=rf"did not answer within {TIMEOUT_S} s"):
                f.result(timeout=60)
        assert [f.result(timeout=60) for f in good] == [want] * 3
    assert time.monotonic() - t0 < len(hung) * TIMEOUT_S * 2 + 10  # bounded, not "until tensorrt_llm answers"
    assert _bls(standin, 4, stream=False) == want  # no worker is held by the hung calls


@pytest.mark.parametrize("max_tokens,msg", [(ERROR, "stand-in engine error"), (RAISE, "stand-in execute raised|"
                                                                                     "did not answer")])
def test_bls_forwards_engine_failures(standin, ckpt, max_tokens, msg):
    for stream in (True, False):
        t0 = time.monotonic()
        with pytest.raises(TritonRequestError, match=msg):
            _bls(standin, max_tokens, stream)
        assert time.monotonic() - t0 < TIMEOUT_S + 10
    assert _bls(standin, 4)


# ----------------------------------------------------------------------------- --decoupled false
@pytest.fixture(scope="module")
def unary(ckpt, tmp_path_factory):
    from trtllm_loop.modeling.load import load_model
    from trtllm_loop.serving.render import render_repository
    from trtllm_loop.serving.server import TritonServer

    d = tmp_path_factory.mktemp("unary")
    repo = render_repository("reference", ckpt, d / "repo", max_seq_len=128, decoupled=False)
    server = TritonServer(repo, log_path=d / "server.log").start(timeout=300)
    server.tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    server.model = load_model(ckpt)
    server.ckpt = ckpt
    yield server
    rc = server.stop()
    assert rc == 0, server.log_tail()


def _want(server, prompt, n, stop_words=True):
    """The reference model's greedy completion with the stop semantics of triton_repo/README.md."""
    eos = server.tok.eos_token_id
    stops = stop_ids(server.ckpt, eos)
    ids = greedy(server.model, server.tok.encode(prompt, add_special_tokens=False), n, end_ids=(eos,),
                 stop_ids=stops if stop_words else ())
    return ids, server.tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unary_infer_when_not_decoupled(unary, protocol):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    mod, url = (grpcclient, unary.grpc_url) if protocol == "grpc" else (httpclient, unary.http_url)
    c = mod.InferenceServerClient(url)
    prompt = "def add(a, b):"
    ids, text = _want(unary, prompt, 12)
    for model in ("ensemble", "tensorrt_llm_bls"):
        inputs = []
        for name, arr, dt in (("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"),
                              ("max_tokens", np.array([[12]], np.int32), "INT32"),
                              ("exclude_input_in_output", np.array([[True]]), "BOOL")):
            t = mod.InferInput(name, list(arr.shape), dt)
            t.set_data_from_numpy(arr)
            inputs.append(t)
        res = c.infer(model, inputs)
        got = res.as_numpy("text_output").reshape(-1)[0]
        assert (got.decode() if isinstance(got, bytes) else got) == text, model
    # tensorrt_llm itself
    p = unary.tok.encode(prompt, add_special_tokens=False)
    inputs = []
    for name, arr, dt in (("input_ids", np.array([p], np.int32), "INT32"),
                          ("input_lengths", np.array([[len(p)]], np.int32), "INT32"),
                          ("request_output_len", np.array([[12]], np.int32), "INT32"),
                          ("end_id", np.array([[unary.tok.eos_token_id]], np.int32), "INT32"),
                          ("exclude_input_in_output", np.array([[True]]), "BOOL")):
        t = mod.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    res = c.infer("tensorrt_llm", inputs)
    n = int(res.as_numpy("sequence_length").reshape(-1)[0])
    out = res.as_numpy("output_ids").reshape(-1)[:n].tolist()
    assert out == _want(unary, prompt, 12, stop_words=False)[0]
    c.close()


def _infer_inputs(mod, arrays):
    dts = {np.int32: "INT32", np.bool_: "BOOL", np.object_: "BYTES"}
    out = []
    for name, arr in arrays.items():
        t = mod.InferInput(name, list(arr.shape), dts[arr.dtype.type])
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unary_infer_with_a_batch_when_not_decoupled(unary, protocol):
    """Issue 10 item 4: a batch of 2 prompts of different lengths (and max_tokens) in one unary request: one
    response whose rows are the prompts' results (rq.BatchResponder, not decoupled), on every model."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    mod, url = (grpcclient, unary.grpc_url) if protocol == "grpc" else (httpclient, unary.http_url)
    c = mod.InferenceServerClient(url)
    prompts, lens = ["def add(a, b):", "hello"], [12, 5]
    want = [_want(unary, p, n) for p, n in zip(prompts, lens)]
    assert len({len(ids) for ids, _ in want}) == 2
    text_arrays = {"text_input": np.array([[p.encode()] for p in prompts], dtype=object),
                   "max_tokens": np.array([[n] for n in lens], np.int32),
                   "exclude_input_in_output": np.array([[True], [True]])}
    for model in ("ensemble", "tensorrt_llm_bls"):
        res = c.infer(model, _infer_inputs(mod, text_arrays))
        got = [t.decode() if isinstance(t, bytes) else t for t in res.as_numpy("text_output").reshape(-1)]
        assert got == [t for _, t in want], model
    ids = [unary.tok.encode(p, add_special_tokens=False) for p in prompts]
    assert len(ids[0]) != len(ids[1])
    width = max(map(len, ids))
    res = c.infer("tensorrt_llm", _infer_inputs(mod, {
        "input_ids": np.array([r + [0] * (width - len(r)) for r in ids], np.int32),
        "input_lengths": np.array([[len(r)] for r in ids], np.int32),
        "request_output_len": np.array([[n] for n in lens], np.int32),
        "end_id": np.full((2, 1), unary.tok.eos_token_id, np.int32),
        "exclude_input_in_output": np.array([[True], [True]])}))
    n = res.as_numpy("sequence_length").reshape(-1).tolist()
    out = res.as_numpy("output_ids").reshape(2, -1)
    assert [out[b, :n[b]].tolist() for b in range(2)] == [_want(unary, p, k, stop_words=False)[0]
                                                          for p, k in zip(prompts, lens)]
    assert res.as_numpy("batch_index").reshape(-1).tolist() == [0, 1]
    c.close()


def test_streaming_refused_when_not_decoupled(unary):
    with pytest.raises(TritonRequestError, match="stream=true needs the decoupled tensorrt_llm_bls"):
        list(grpc_stream(unary.grpc_url, "tensorrt_llm_bls", request_fields("hi", 4), stream=True))
    # the generate extension (one response) works
    assert http_generate(unary.http_url, "tensorrt_llm_bls", request_fields("hi", 4)) == _want(unary, "hi", 4)[1]
    assert grpc_generate(unary.grpc_url, "ensemble", request_fields("hi", 4), stream=False) == _want(unary, "hi", 4)[1]
