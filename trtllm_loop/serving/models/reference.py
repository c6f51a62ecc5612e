"""Triton `tensorrt_llm` for the CPU `reference` flavour: the paged runtime emulator
(``trtllm_loop.runtime.LoopRuntime``) behind the exact tensor contract of TensorRT-LLM's C++ backend.

* decoupled; ``streaming=true`` -> one response per generated token (only the new ids), else one response
  with the whole sequence (prompt + completion unless ``exclude_input_in_output``);
* in-flight batching: one engine thread runs ``LoopRuntime.step()`` over every active request; requests that
  arrive meanwhile join the next step, finished ones leave at once;
* ``end_id`` ends generation and is not returned (TRT-LLM semantics); ``stop_words_list`` sequences end it and
  are returned;
* cancellation: a client that cancels its stream (``response_sender.is_cancelled()``), or a request with
  ``stop=true`` and the same request id (TRT-LLM's way; used by the BLS model);
* bad requests get a Triton error naming the input (INVALID_ARG, HTTP 400); the engine keeps serving the others;
* a failure inside the engine (a step raising) fails only the request that caused it: the step's requests are
  taken out of the runtime, each is re-run alone from its prompt plus the tokens it already has (greedy output
  is unchanged; a seeded sampler restarts its generator), the one whose solo step fails gets the error (one line
  to the client, the trace in the server log) and the others go on batched;
* ``decoupled: false`` (``--decoupled false``): one response per request (a batch: the prompts' rows stacked,
  ``rq.BatchResponder``), ``streaming=true`` is refused;
* a ``request_output_len`` over what fits in ``max_seq_len`` is cut like TRT-LLM does, with a warning in the
  server log (the client-contract models refuse it instead: ``contract.check_context``).
"""
import dataclasses
import json
import os
import queue
import sys
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import loop_contract as rq  # rendered repository: 1/loop_contract.py
    import loop_text as lt
except ImportError:  # pragma: no cover - running from the source tree
    from trtllm_loop.serving import contract as rq
    from trtllm_loop.serving import textproc as lt

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_S = 0.05
# tensorrt_llm inputs the paged runtime has no counterpart for (rq.LLMRequest.features names)
# (log probs, context / generation logits, perf metrics and token counts it returns: rq.RETURN_FLAGS, COUNT_FLAGS)
UNSUPPORTED = ("beam_width", "num_return_sequences", "repetition_penalty", "presence_penalty", "frequency_penalty",
               "min_tokens", "bad_words_list")
LOGIT_FLAGS = ("return_log_probs", "return_context_logits", "return_generation_logits")


class _Active:
    __slots__ = ("sender", "streaming", "exclude", "prompt", "end_id", "output", "triton_id", "rid", "peak", "sp",
                 "counts", "returns", "rows", "skip_rows", "logprobs", "sent_rows", "sent_lp", "times", "blocks",
                 "group", "index")

    def __init__(self, sender, streaming, exclude, prompt, end_id, triton_id, sp=None):
        self.sender, self.streaming, self.exclude = sender, streaming, exclude
        self.prompt, self.end_id, self.triton_id = prompt, end_id, triton_id
        self.sp = sp
        self.counts = ()
        self.returns = ()
        self.rows: list = []       # logits rows of every position so far (when logits or log probs are asked for)
        self.skip_rows = 0         # rows a continuation recomputes that we already have
        self.logprobs: list[float] = []
        self.sent_rows = self.sent_lp = 0
        self.times = {"arrival_time_ns": time.time_ns()}
        self.blocks = 0
        self.output: list[int] = []
        self.rid = None
        self.peak = 0  # largest in-flight batch this request was part of
        self.group = None  # rq.BatchResponder of the Triton request this prompt is row ``index`` of
        self.index = 0


def _ids_parts(ids: list[int], a=None) -> list:
    """The outputs of one response of prompt ``a`` (rq.BatchResponder builds or stacks them)."""
    out = [("output_ids", np.array(ids, dtype=np.int32).reshape(1, 1, len(ids))),
           ("sequence_length", np.array([[len(ids)]], dtype=np.int32)),
           ("batch_index", np.array([[a.index if a is not None else 0]], dtype=np.int32)),
           ("sequence_index", np.array([[0]], dtype=np.int32))]
    counts = a.counts if a is not None else ()
    if a is not None:
        out += _returned(a)
    if "return_num_input_tokens" in counts:
        out.append(("num_input_tokens", np.array([[len(a.prompt)]], dtype=np.int32)))
    if "return_num_output_tokens" in counts:  # generated so far
        out.append(("num_output_tokens", np.array([[len(a.output)]], dtype=np.int32)))
    return out


def _build(parts) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in parts])


def _returned(a) -> list:
    """The outputs ``a`` asked for with its RETURN_FLAGS, for what is new since its last response."""
    out = []
    want = a.returns
    n_prompt = len(a.prompt)
    if "return_log_probs" in want:
        lp = a.logprobs[a.sent_lp:len(a.output)]
        out += [("output_log_probs", np.array(lp, dtype=np.float32).reshape(1, 1, len(lp))),
                ("cum_log_probs", np.array([[sum(a.logprobs[:len(a.output)])]], dtype=np.float32))]
    if "return_context_logits" in want and a.sent_rows == 0 and len(a.rows) >= n_prompt:
        out.append(("context_logits", np.stack(a.rows[:n_prompt])[None].astype(np.float32)))
    if "return_generation_logits" in want:
        # row n_prompt - 1 + i produced generated token i
        start, end = n_prompt - 1 + a.sent_lp, n_prompt - 1 + len(a.output)
        g = np.stack(a.rows[start:end]) if end > start else np.zeros((0, 0), np.float32)
        out.append(("generation_logits", g[None, None].astype(np.float32)))
    if "return_perf_metrics" in want:
        t = a.times
        out += [(k, np.array([[t.get(k, 0)]], dtype=np.int64)) for k in (
            "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")]
        out += [("kv_cache_alloc_new_blocks", np.array([[a.blocks]], dtype=np.int32)),
                ("kv_cache_reused_blocks", np.array([[0]], dtype=np.int32)),  # no prefix reuse
                ("kv_cache_alloc_total_blocks", np.array([[a.blocks]], dtype=np.int32)),
                ("acceptance_rate", np.array([[0.0]], dtype=np.float32)),  # no speculative decoding
                ("total_accepted_draft_tokens", np.array([[0]], dtype=np.int32)),
                ("total_draft_tokens", np.array([[0]], dtype=np.int32))]
    a.sent_lp = len(a.output)
    a.sent_rows = len(a.rows)
    return out


def _log(msg: str, level: str = "log_info"):
    try:
        getattr(pb_utils.Logger, level)(msg)
    except Exception:
        pass


def _log_error(msg: str):
    _log(msg, "log_error")


def _error(exc: BaseException):
    return rq.error_response(pb_utils, exc, "tensorrt_llm", _log_error)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = lt.parameters(config)
        self.decoupled = bool((config.get("model_transaction_policy") or {}).get("decoupled", False))
        path = params.get("python_path")
        if path and path not in sys.path:
            try:
                import trtllm_loop  # noqa: F401
            except ImportError:
                sys.path.insert(0, path)
        import torch

        from trtllm_loop.runtime import LoopRuntime, SamplingParams

        torch.set_num_threads(int(params.get("torch_threads") or 1))
        self.SamplingParams = SamplingParams
        ckpt = params.get("checkpoint_dir", "")
        if not ckpt or not os.path.isdir(ckpt):
            raise RuntimeError(f"parameter checkpoint_dir={ckpt!r} is not a directory: re-render the repository "
                               "with `trtllm-loop triton-repo --flavour reference --model DIR`")
        kw = dict(dtype=params.get("dtype") or "float32",
                  tokens_per_block=int(params.get("tokens_per_block") or 16),
                  max_batch_size=int(params.get("max_batch_size") or 8),
                  max_num_tokens=int(params.get("max_num_tokens") or 256))
        if params.get("max_seq_len"):
            kw["max_seq_len"] = int(params["max_seq_len"])
        self.rt = LoopRuntime.from_checkpoint(ckpt, **kw)
        self.max_seq_len = self.rt.max_seq_len
        self.vocab = self.rt.cfg.vocab_size
        self.default_exclude = (params.get("exclude_input_in_output") or "false").lower() == "true"
        self.inbox: queue.Queue = queue.Queue()
        self.active: dict = {}
        self.stop_flag = threading.Event()
        self.steps = 0
        self.max_concurrent = 0
        self._last_cancel_check = 0.0
        self.thread = threading.Thread(target=self._engine_loop, name="loop-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ requests (Triton thread)
    def _sampling_params(self, req):
        import torch

        req.reject(UNSUPPORTED, "the reference runtime")
        s = req.sampling
        return self.SamplingParams(
            max_tokens=req.output_len, temperature=0.0 if s.temperature is None else s.temperature,
            top_k=s.top_k or 0, top_p=1.0 if s.top_p is None else s.top_p, seed=s.seed,
            # end_id < 0: no end token (TRT-LLM); unset: the model's eos ids
            stop_token_ids=None if req.end_id is None else ((req.end_id,) if req.end_id >= 0 else ()),
            stop_sequences=req.stop_words, ignore_eos=False,
            embedding_bias=None if req.bias is None else torch.from_numpy(req.bias))

    def execute(self, requests):
        for request in requests:  # each request answers for itself: a bad one never touches the others
            sender = request.get_response_sender()
            try:
                inp = rq.Inputs.of(request, pb_utils)
                if rq.is_stop(inp):
                    self.inbox.put(("stop", request.request_id(), sender))
                    continue
                # a batch: one engine request per prompt, answered by rq.BatchResponder's rule (batch_index)
                reqs = rq.parse_llm_requests(inp, default_exclude=self.default_exclude, vocab_size=self.vocab,
                                             max_seq_len=self.max_seq_len)
                if any(r.streaming for r in reqs) and not self.decoupled:
                    raise rq.RequestError("streaming=true needs the decoupled tensorrt_llm model: render the "
                                          "repository with `trtllm-loop triton-repo --decoupled true`")
                sps = [self._sampling_params(r) for r in reqs]
            except Exception as e:
                sender.send(_error(e), flags=FINAL)
                continue
            # decoupled: one result per prompt (batch_index); else the prompts' rows in one response
            group = rq.BatchResponder(sender, len(reqs), FINAL, _build, merge=not self.decoupled)
            for b, (req, sp) in enumerate(zip(reqs, sps)):
                if req.asked_len > req.output_len:
                    _log(f"tensorrt_llm: request {request.request_id()!r}: request_output_len {req.asked_len} cut "
                         f"to {req.output_len} to fit max_seq_len {self.max_seq_len} with its "
                         f"{len(req.input_ids)} prompt tokens", "log_warn")
                a = _Active(sender, req.streaming, req.exclude_input, req.input_ids, req.end_id,
                            request.request_id(), sp)
                a.counts, a.returns, a.group, a.index = req.counts, req.returns, group, b
                self.inbox.put(("add", a, sp))
        return None

    # ------------------------------------------------------------------ engine thread
    def _engine_loop(self):
        while not self.stop_flag.is_set():
            try:
                self._drain_inbox(block=not self.rt.has_unfinished())
                self._check_cancelled()
                if not self.rt.has_unfinished():
                    continue
                outs = self.rt.step()
                self.steps += 1
                batch = sum(1 for o in outs if o.request_id in self.active)
                self.max_concurrent = max(self.max_concurrent, batch)
                for o in outs:
                    a = self.active.get(o.request_id)
                    if a is not None:
                        a.peak = max(a.peak, batch)
                for o in outs:
                    self._emit(o)
            except Exception as e:  # keep serving: find the request that fails, fail it alone
                _log_error(rq.error_text(e, "tensorrt_llm: engine step failed", _log_error)
                           + f"; isolating it among {len(self.active)} requests")
                try:
                    self._isolate()
                except Exception as e2:  # pragma: no cover - last resort: fail the rest, keep the model
                    for a in list(self.active.values()):
                        self._safe_send(a, _error(e2), FINAL)
                    self.active.clear()
                    self._reset_runtime()

    # ------------------------------------------------------------------ engine failures
    def _continue(self, a):
        """(Re-)add ``a`` to the runtime from its prompt plus the tokens it already has."""
        left = a.sp.max_tokens - len(a.output)
        a.skip_rows = len(a.rows)  # the re-prefill recomputes rows we have
        a.rid = self.rt.add_request(a.prompt + a.output, dataclasses.replace(a.sp, max_tokens=left),
                                    return_logits=self._wants_logits(a))
        self.active[a.rid] = a

    @staticmethod
    def _wants_logits(a) -> bool:
        return any(f in a.returns for f in LOGIT_FLAGS)

    def _isolate(self):
        """After a failed step: run each of its requests alone for one token; the ones that fail alone get the
        error, the others are re-added together."""
        suspects = list(self.active.values())
        self.active.clear()
        self._reset_runtime()
        survivors = []
        for a in suspects:
            try:
                self._continue(a)
                for _ in range(len(a.prompt + a.output) // max(self.rt.max_num_tokens, 1) + 3):  # bounded
                    before = len(a.output)
                    for o in self.rt.step():
                        self._emit(o)
                    if a.rid not in self.active or len(a.output) > before:
                        break
            except Exception as e:
                self.active.pop(a.rid, None)
                self._safe_send(a, _error(e), FINAL)
                _log_error(f"tensorrt_llm: request {a.triton_id!r} failed alone and was ended with the error")
                self._reset_runtime()
                continue
            if a.rid in self.active:  # passed: out of the runtime until every suspect has run
                self.active.pop(a.rid)
                self._reset_runtime()
                survivors.append(a)
        for a in survivors:
            try:
                self._continue(a)
            except Exception as e:
                self._safe_send(a, _error(e), FINAL)

    def _reset_runtime(self):
        # drop whatever the failed step left behind
        for q in (self.rt.waiting, self.rt.running):
            for r in list(q):
                try:
                    self.rt.cancel(r.id)
                except Exception:
                    pass
        self.rt.cancelled.clear()

    def _drain_inbox(self, block: bool):
        try:
            item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item[0] == "add":
                _, a, sp = item
                try:
                    a.rid = self.rt.add_request(a.prompt, sp, return_logits=self._wants_logits(a))
                    a.times["first_scheduled_time_ns"] = time.time_ns()
                    a.blocks = self.rt.cfg.pool_blocks_per_sequence(
                        None, self.rt.cache.tpb, min(len(a.prompt) + sp.max_tokens, self.max_seq_len))
                    self.active[a.rid] = a
                except ValueError as e:
                    self._safe_send(a, _error(rq.RequestError(f"tensorrt_llm: {e}")), FINAL)
            elif item[0] == "stop":
                _, triton_id, sender = item
                for a in list(self.active.values()):
                    if triton_id and a.triton_id == triton_id:
                        self.rt.cancel(a.rid)
                try:  # a non-decoupled model must send a response with its final flag
                    sender.send(None if self.decoupled else _build(_ids_parts([])), flags=FINAL)
                except Exception:
                    pass
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _check_cancelled(self):
        # is_cancelled() is an IPC round trip to the server: poll every CANCEL_CHECK_S, like TRT-LLM's
        # cancellation_check_period_ms, not every step
        now = time.monotonic()
        if now - self._last_cancel_check < CANCEL_CHECK_S:
            return
        self._last_cancel_check = now
        for a in list(self.active.values()):
            try:
                cancelled = a.sender.is_cancelled()
            except Exception:
                cancelled = False
            if cancelled:
                self.rt.cancel(a.rid)

    def _safe_send(self, a, response=None, flags=0, parts=None):
        """Send for ``a``'s prompt (``parts``, or a ready ``response``: an error); ``flags`` FINAL ends that prompt
        (the request ends with its last prompt)."""
        try:
            a.group.send(response, last=bool(flags & FINAL), parts=parts, index=a.index)
        except Exception:
            pass  # the client is gone

    def _emit(self, o):
        a = self.active.get(o.request_id)
        if a is None:
            return
        new = list(o.token_ids)
        if o.logits is not None:
            rows = [r.numpy() for r in o.logits.float()]
            if a.skip_rows:
                k = min(a.skip_rows, len(rows))
                rows, a.skip_rows = rows[k:], a.skip_rows - k
            a.rows += rows
            if new:  # the last row produced the sampled token (TRT-LLM's log probs: of the raw logits)
                import torch

                lp = torch.log_softmax(o.logits[-1].float(), -1)[new[-1]]
                a.logprobs.append(float(lp))
        if new:
            now = time.time_ns()
            a.times.setdefault("first_token_time_ns", now)
            a.times["last_token_time_ns"] = now
        if o.finished and o.finish_reason == "stop" and new and a.end_id is not None and new[-1] == a.end_id:
            new = new[:-1]  # TRT-LLM does not return end_id
        a.output += new
        if a.streaming:
            if new and not o.finished:
                self._safe_send(a, parts=_ids_parts(new, a))
            elif o.finished:
                if new or a.counts or a.returns:
                    self._safe_send(a, None, FINAL, parts=_ids_parts(new, a))
                else:
                    self._safe_send(a, None, FINAL)
        elif o.finished:
            ids = a.output if a.exclude else a.prompt + a.output
            self._safe_send(a, None, FINAL, parts=_ids_parts(ids, a))
        if o.finished:
            self.active.pop(o.request_id, None)
            _log(f"tensorrt_llm: request {a.triton_id or o.request_id!r} finished ({o.finish_reason}) after "
                 f"{len(a.output)} tokens; peak in-flight batch {a.peak}")

    def finalize(self):
        self.stop_flag.set()
        self.thread.join(timeout=5)
