"""Triton `tensorrt_llm_bls`: the client contract of `ensemble`, with exact streaming.

Per request (each on a worker thread, so requests run concurrently and batch in `tensorrt_llm`; ``execute()``
only reads the tensors, so a slow tokenization never holds up another request):
tokenize + chat template (same code as `preprocessing`) -> `tensorrt_llm` via BLS (streamed internally when the
repository is decoupled) -> incremental detokenization (whole UTF-8 characters, SentencePiece spaces kept) ->
text-level stop words (the output ends with the first stop word: textproc.STOP_WORD_INCLUDED) -> streamed deltas or one final text. A
client cancel or a stop-string hit cancels the `tensorrt_llm` request (TRT-LLM's `stop` request, same request
id). The concatenation of the streamed deltas equals the non-streamed text; streaming never echoes the prompt
(upstream's BLS does not either: ``triton_backend/all_models/inflight_batcher_llm/tensorrt_llm_bls/1/lib/
triton_decoder.py``).

Bounded time, whatever happens below: every response of `tensorrt_llm` is awaited at most
``response_timeout_s`` (the BLS call runs on a pump thread; the worker waits on a queue), so each request ends
with its final response or an error, and a `tensorrt_llm` that never answers holds no worker.

The stub must not crash under many concurrent decoupled BLS calls: a finished response iterator is kept referenced
here for ``RETIRE_S`` (``_retire``). In the Python backend of Triton 24.10 (the nvidia-pytriton bundle) the
stub's cleanup thread erases the iterator from its ``response_iterator_map_`` after the last response
(``ResponseIterator::Clear`` -> ``Stub::SendCleanupId``, src/pb_stub.cc) without holding the GIL; when that erase
drops the last reference, the iterator's responses and their numpy arrays are freed there, off the GIL -- a
refcount race that kills the stub now and then (its process becomes a zombie; Triton 24.10 still reports the
model ready and every later BLS request hangs). Fixed upstream in python_backend r24.12 ("Hold GIL when deleting
numpy array", #390); holding the reference keeps the last release on a Python thread, with the GIL.
"""
import collections
import json
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import loop_contract as rq  # rendered repository: 1/loop_contract.py
    import loop_text as lt
except ImportError:  # pragma: no cover - running from the source tree
    from trtllm_loop.serving import contract as rq
    from trtllm_loop.serving import textproc as lt

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_END = object()
CANCEL_CHECK_S = 0.05
# how long a finished BLS response iterator is kept referenced here (see TritonPythonModel._retire)
RETIRE_S = 30.0


def _text(s: str, counts: dict | None = None, extra: list | None = None, batch_index: int | None = None) -> list:
    """The outputs of one response (rq.BatchResponder builds or stacks them): ``text_output`` of shape [1] like
    upstream's BLS (its clients read text_output[0] as bytes); a prompt of a batch is tagged with its row
    (batch_index, as upstream's tensorrt_llm_bls/1/model.py get_batch_index reads it)."""
    out = [("text_output", np.array([s.encode("utf-8")], dtype=object))]
    if batch_index is not None:
        out.append(("batch_index", np.array([[batch_index]], dtype=np.int32)))
    out += [(k, np.array([[v]], dtype=np.int32)) for k, v in (counts or {}).items()]
    return out + (extra or [])


def _build(parts):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in parts])


def _log_error(msg: str):
    try:
        pb_utils.Logger.log_error(msg)
    except Exception:
        pass


class _Timeout(Exception):
    pass


class _PromptSender:
    """The response sender of one prompt of a request (row ``index`` of a batch; None: a one-prompt request):
    FINAL ends the prompt, the request's final flag is rq.BatchResponder's."""

    def __init__(self, sender, group, index):
        self.sender, self.group, self.index = sender, group, index

    def send(self, response=None, flags=0, parts=None):
        self.group.send(response, last=bool(flags & FINAL), parts=parts, index=self.index or 0)

    def is_cancelled(self):
        return self.sender.is_cancelled()


PERF = ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks", "arrival_time_ns",
        "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns", "acceptance_rate",
        "total_accepted_draft_tokens", "total_draft_tokens")
RETURNED = {"return_log_probs": ("cum_log_probs", "output_log_probs"), "return_context_logits": ("context_logits",),
            "return_generation_logits": ("generation_logits",), "return_perf_metrics": PERF}


def _returned_names(returns) -> list:
    return [n for r in returns for n in RETURNED[r]]


class _Extras:
    """tensorrt_llm's extra outputs across the responses of one request: log probs and generation logits
    accumulate, the rest is the latest."""

    def __init__(self, returns):
        self.names = _returned_names(returns)
        self.latest: dict = {}
        self.lp: list = []
        self.gen: list = []

    def add(self, resp):
        for n in self.names:
            t = pb_utils.get_output_tensor_by_name(resp, n)
            if t is None:
                continue
            a = t.as_numpy()
            if n == "output_log_probs":
                self.lp.append(a.reshape(-1))
            elif n == "generation_logits":
                if a.size:
                    self.gen.append(a.reshape(-1, a.shape[-1]))
            elif n != "context_logits" or n not in self.latest:
                self.latest[n] = a

    def tensors(self, final: bool) -> list:
        """Outputs for a response: perf metrics always, the rest on the final response only."""
        out = [(n, self.latest[n]) for n in PERF if n in self.latest]
        if not final:
            return out
        for n in ("cum_log_probs", "context_logits"):
            if n in self.latest:
                out.append((n, self.latest[n]))
        if "output_log_probs" in self.names:
            lp = np.concatenate(self.lp) if self.lp else np.zeros(0, np.float32)
            out.append(("output_log_probs", lp.astype(np.float32).reshape(1, 1, -1)))
        if "generation_logits" in self.names and self.gen:
            out.append(("generation_logits", np.concatenate(self.gen)[None, None].astype(np.float32)))
        return out


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = lt.parameters(config)
        self.decoupled = bool((config.get("model_transaction_policy") or {}).get("decoupled", False))
        self.pre = lt.preprocessor_from_params(params)
        self.tok = self.pre.tok
        self.skip_special = (params.get("skip_special_tokens") or "true").lower() == "true"
        self.llm = params.get("tensorrt_llm_model_name") or "tensorrt_llm"
        self.default_exclude = (params.get("exclude_input_in_output") or "false").lower() == "true"
        self.timeout = float(params.get("response_timeout_s") or 300)
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_concurrency") or 64),
                                       thread_name_prefix="bls")
        self.retired: collections.deque = collections.deque()
        self.retired_lock = threading.Lock()

    def execute(self, requests):
        for request in requests:  # each request answers for itself: a bad one never touches the others
            sender = request.get_response_sender()
            try:
                inp = rq.Inputs.of(request, pb_utils)
                # the cheap checks here (types, byte size, ...); tokenizing happens on the worker thread
                # a batch (text_input [batch, 1]): each prompt runs as its own job and answers by
                # rq.BatchResponder's rule (batch_index), as upstream's BLS reads a batched tensorrt_llm
                # (tensorrt_llm_bls/1/lib/decode.py: batch_size = text_input.shape[0], postprocess by batch_index)
                reqs = rq.parse_text_requests(inp, max_output_len=self.pre.max_output_len,
                                              default_exclude=self.default_exclude,
                                              max_prompt_bytes=self.pre.max_prompt_bytes)
                if any(r.stream for r in reqs) and not self.decoupled:
                    raise rq.RequestError("stream=true needs the decoupled tensorrt_llm_bls: render the repository "
                                          "with `trtllm-loop triton-repo --decoupled true`, or send stream=false")
            except Exception as e:
                self._final_error(sender, e)
                continue
            # decoupled: one result per prompt (batch_index); else the prompts' rows in one response
            group = rq.BatchResponder(sender, len(reqs), FINAL, _build, merge=not self.decoupled)
            for b, req in enumerate(reqs):
                rid = f"bls-{request.request_id() or ''}-{uuid.uuid4().hex[:12]}"
                self.pool.submit(self._run_safe, req, rid, _PromptSender(sender, group, b if len(reqs) > 1 else None))
        return None

    def _final_error(self, sender, exc):
        try:
            sender.send(rq.error_response(pb_utils, exc, "tensorrt_llm_bls", _log_error), flags=FINAL)
        except Exception:
            pass  # the client is gone

    # ------------------------------------------------------------------ request -> job
    def _prepare(self, req):
        job = self.pre.prepare(req)
        job["stream"], job["exclude"], job["counts"] = req.stream, req.exclude_input, req.counts
        job["passthrough"] = req.sampling.llm_tensors()
        job["returns"] = req.returns
        for flag in req.returns:
            job["passthrough"][flag] = np.array([[True]], dtype=np.bool_)
        job["passthrough"].update(req.forwarded)  # LoRA, prompt tables, guided decoding: tensorrt_llm decides
        if job["embedding_bias"] is not None:
            job["passthrough"]["embedding_bias"] = job["embedding_bias"][None]
        return job

    def _llm_request(self, job, request_id):
        ids = np.array([job["input_ids"]], dtype=np.int32)
        tensors = [
            pb_utils.Tensor("input_ids", ids),
            pb_utils.Tensor("input_lengths", np.array([[ids.shape[1]]], dtype=np.int32)),
            pb_utils.Tensor("request_output_len", np.array([[job["max_tokens"]]], dtype=np.int32)),
            pb_utils.Tensor("end_id", np.array([[job["end_id"]]], dtype=np.int32)),
            pb_utils.Tensor("pad_id", np.array([[job["pad_id"]]], dtype=np.int32)),
            pb_utils.Tensor("stop_words_list", job["stop_words_list"][None]),
            pb_utils.Tensor("streaming", np.array([[self.decoupled]], dtype=np.bool_)),
            pb_utils.Tensor("exclude_input_in_output", np.array([[True]], dtype=np.bool_)),
        ]
        if job["bad_words_list"][1, 0] >= 0:
            tensors.append(pb_utils.Tensor("bad_words_list", job["bad_words_list"][None]))
        tensors += [pb_utils.Tensor(name, arr) for name, arr in job["passthrough"].items()]
        return pb_utils.InferenceRequest(model_name=self.llm, inputs=tensors, request_id=request_id,
                                         requested_output_names=["output_ids", "sequence_length",
                                                                 *_returned_names(job["returns"])])

    def _pump(self, request):
        """Run a BLS call on its own thread; its responses (then ``_END``) arrive on the returned queue."""
        q: queue.Queue = queue.Queue()

        def run():
            try:
                if self.decoupled:
                    responses = request.exec(decoupled=True)
                    try:
                        for resp in responses:
                            q.put(resp)
                    finally:
                        self._retire(responses)
                else:
                    q.put(request.exec())
            except Exception as e:
                q.put(e)
            q.put(_END)

        threading.Thread(target=run, name="bls-pump", daemon=True).start()
        return q

    def _retire(self, responses):
        """Keep a finished decoupled response iterator referenced for RETIRE_S, then drop it here (a Python thread,
        with the GIL): never let the stub's cleanup thread release it last (module docstring)."""
        now = time.monotonic()
        with self.retired_lock:
            self.retired.append((now, responses))
            old = []
            while self.retired and now - self.retired[0][0] > RETIRE_S:
                old.append(self.retired.popleft()[1])
        del old  # released outside the lock, on this thread

    def _next(self, q):
        try:
            item = q.get(timeout=self.timeout)
        except queue.Empty:
            raise _Timeout() from None
        if isinstance(item, Exception):
            raise item
        return item

    def _cancel_llm(self, request_id):
        """TRT-LLM's stop request for ``request_id``; waits at most ``response_timeout_s`` for its answer."""
        stop = pb_utils.InferenceRequest(
            model_name=self.llm, request_id=request_id, requested_output_names=["output_ids"],
            inputs=[pb_utils.Tensor("input_ids", np.array([[0]], dtype=np.int32)),
                    pb_utils.Tensor("input_lengths", np.array([[1]], dtype=np.int32)),
                    pb_utils.Tensor("request_output_len", np.array([[1]], dtype=np.int32)),
                    pb_utils.Tensor("stop", np.array([[True]], dtype=np.bool_)),
                    pb_utils.Tensor("streaming", np.array([[self.decoupled]], dtype=np.bool_))])
        q = self._pump(stop)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                if q.get(timeout=max(deadline - time.monotonic(), 0.01)) is _END:
                    return
            except queue.Empty:
                break
        _log_error(f"tensorrt_llm_bls: the stop request for {request_id} got no answer in {self.timeout:g} s")

    # ------------------------------------------------------------------ generation (worker thread)
    def _run_safe(self, req, request_id, sender):
        try:
            self._run(self._prepare(req), request_id, sender)
        except _Timeout:
            _log_error(f"tensorrt_llm_bls: {self.llm} sent no response for {request_id} within {self.timeout:g} s")
            try:
                self._cancel_llm(request_id)
            except Exception:
                pass
            self._final_error(sender, rq.RequestError(
                f"tensorrt_llm_bls: {self.llm} did not answer within {self.timeout:g} s (response_timeout_s); "
                "the request was cancelled: retry, or ask the operator to check the server log"))
        except Exception as e:
            self._final_error(sender, e)

    def _run(self, job, request_id, sender):
        detok = lt.IncrementalDetokenizer(self.tok, skip_special_tokens=self.skip_special)
        matcher = lt.StopStringMatcher(job["stop_words"])
        pieces: list[str] = []
        extras = _Extras(job["returns"])

        def emit(s: str):
            if not s:
                return
            if job["stream"]:
                sender.send(parts=_text(s, extra=extras.tensors(final=False), batch_index=sender.index))
            else:
                pieces.append(s)

        if not job["exclude"] and not job["stream"]:  # upstream never echoes the prompt when streaming
            emit(detok.push(job["input_ids"]))
        cancelled = False
        generated = 0
        last_check = time.monotonic()
        q = self._pump(self._llm_request(job, request_id))
        while True:
            resp = self._next(q)
            if resp is _END:
                break
            if resp.has_error():
                sender.send(pb_utils.InferenceResponse(error=resp.error()), flags=FINAL)
                return
            out = pb_utils.get_output_tensor_by_name(resp, "output_ids")
            if out is not None:
                ids = out.as_numpy().reshape(-1).tolist()
                n = pb_utils.get_output_tensor_by_name(resp, "sequence_length")
                if n is not None:
                    ids = ids[:int(np.asarray(n.as_numpy()).reshape(-1)[0])]
                generated += len(ids)
                extras.add(resp)
                emit(matcher.feed(detok.push(ids)))
            client_gone = False
            if self.decoupled and time.monotonic() - last_check > CANCEL_CHECK_S:  # an IPC round trip: poll
                last_check = time.monotonic()
                client_gone = sender.is_cancelled()
            if matcher.stopped or client_gone:
                cancelled = True
                if self.decoupled:  # a non-decoupled tensorrt_llm has already finished
                    self._cancel_llm(request_id)
                    while self._next(q) is not _END:  # drain the cancelled stream (bounded like any response)
                        pass
                break
        if not cancelled or matcher.stopped:
            emit(matcher.feed(detok.flush()) + matcher.flush())
        if self.decoupled and sender.is_cancelled():
            sender.send(flags=FINAL)
            return
        counts = {}
        if "return_num_input_tokens" in job["counts"]:
            counts["num_input_tokens"] = len(job["input_ids"])
        if "return_num_output_tokens" in job["counts"]:
            counts["num_output_tokens"] = generated
        if job["stream"] and not counts and not job["returns"]:
            sender.send(flags=FINAL)
        else:  # streaming: the counts and returned outputs ride on the final response, with no more text
            sender.send(parts=_text("" if job["stream"] else "".join(pieces), counts, extras.tensors(final=True),
                                    batch_index=sender.index), flags=FINAL)

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
