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
* bad requests get a Triton error naming the input; the engine keeps serving the others.
"""
import json
import os
import queue
import sys
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import loop_text as lt
except ImportError:  # pragma: no cover
    from trtllm_loop.serving import textproc as lt

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_S = 0.05


def _opt(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _scalar(request, name, default=None, cast=None):
    a = _opt(request, name)
    if a is None:
        return default
    a = np.asarray(a).reshape(-1)
    if a.size == 0:
        return default
    v = a[0].item() if hasattr(a[0], "item") else a[0]
    return cast(v) if cast else v


class _Active:
    __slots__ = ("sender", "streaming", "exclude", "prompt", "end_id", "output", "triton_id", "rid", "peak")

    def __init__(self, sender, streaming, exclude, prompt, end_id, triton_id):
        self.sender, self.streaming, self.exclude = sender, streaming, exclude
        self.prompt, self.end_id, self.triton_id = prompt, end_id, triton_id
        self.output: list[int] = []
        self.rid = None
        self.peak = 0  # largest in-flight batch this request was part of


def _ids_response(ids: list[int]):
    arr = np.array([[ids]], dtype=np.int32).reshape(1, 1, len(ids))
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", arr),
        pb_utils.Tensor("sequence_length", np.array([[len(ids)]], dtype=np.int32)),
        pb_utils.Tensor("batch_index", np.array([[0]], dtype=np.int32)),
        pb_utils.Tensor("sequence_index", np.array([[0]], dtype=np.int32)),
    ])


def _log(msg: str):
    try:
        pb_utils.Logger.log_info(msg)
    except Exception:
        pass


def _error(msg: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))


class TritonPythonModel:
    def initialize(self, args):
        params = lt.parameters(json.loads(args["model_config"]))
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

    # ------------------------------------------------------------------ request parsing (Triton thread)
    def _parse(self, request):
        ids = _opt(request, "input_ids")
        if ids is None:
            raise lt.RequestError("input_ids is missing: send the prompt token ids (INT32 [1, N])")
        ids = np.asarray(ids)
        if ids.ndim == 2 and ids.shape[0] != 1:
            raise lt.RequestError(f"batch of {ids.shape[0]} prompts in one request: the reference runtime takes one "
                                  "prompt per request; send concurrent requests instead")
        ids = ids.reshape(-1).astype(np.int64).tolist()
        n = _scalar(request, "input_lengths", len(ids), int)
        if not 0 < n <= len(ids):
            raise lt.RequestError(f"input_lengths={n} but input_ids has {len(ids)} ids: send 1..{len(ids)}")
        ids = ids[:n]
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise lt.RequestError(f"input_ids contains {bad[0]}, outside the vocabulary [0, {self.vocab})")
        if n >= self.max_seq_len:
            raise lt.RequestError(f"the prompt is {n} tokens long; this model serves at most {self.max_seq_len - 1} "
                                  "prompt tokens (max_seq_len - 1): shorten the prompt")
        out_len = _scalar(request, "request_output_len", None, int)
        if out_len is None or out_len < 1:
            raise lt.RequestError(f"request_output_len must be >= 1, got {out_len}: ask for at least one token")
        out_len = min(out_len, self.max_seq_len - n)
        for name, default in (("beam_width", 1), ("num_return_sequences", 1)):
            v = _scalar(request, name, default, int)
            if v != default:
                raise lt.RequestError(f"{name}={v} is not supported by the reference runtime: use {default}")
        for name, default in (("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                              ("min_tokens", 0)):
            v = _scalar(request, name, default, float)
            if v != default and not (name == "min_tokens" and v <= 1):
                raise lt.RequestError(f"{name}={v} is not supported by the reference runtime: leave it unset")
        for name in ("return_log_probs", "return_context_logits", "return_generation_logits"):
            if _scalar(request, name, False, bool):
                raise lt.RequestError(f"{name} is not supported by the reference runtime: leave it unset")
        if _opt(request, "embedding_bias") is not None and np.asarray(_opt(request, "embedding_bias")).size:
            raise lt.RequestError("embedding_bias is not supported by the reference runtime: leave it unset")
        if lt.from_word_list(_opt(request, "bad_words_list")):
            raise lt.RequestError("bad_words are not supported by the reference runtime: leave them unset")
        temperature = _scalar(request, "temperature", 0.0, float)
        top_k = _scalar(request, "runtime_top_k", 0, int)
        top_p = _scalar(request, "runtime_top_p", 1.0, float)
        if temperature < 0:
            raise lt.RequestError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise lt.RequestError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not 0 < top_p <= 1:
            raise lt.RequestError(f"top_p must be in (0, 1], got {top_p}")
        seed = _scalar(request, "seed", None, int)
        end_id = _scalar(request, "end_id", None, int)
        stops = lt.from_word_list(_opt(request, "stop_words_list"))
        sp = self.SamplingParams(max_tokens=out_len, temperature=temperature, top_k=top_k,
                                 top_p=top_p if top_p > 0 else 1.0, seed=seed,
                                 # end_id < 0: no end token (TRT-LLM); unset: the model's eos ids
                                 stop_token_ids=None if end_id is None else ((end_id,) if end_id >= 0 else ()),
                                 stop_sequences=stops, ignore_eos=False)
        exclude = _scalar(request, "exclude_input_in_output", self.default_exclude, bool)
        streaming = _scalar(request, "streaming", False, bool)
        return ids, sp, streaming, exclude, end_id

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                if _scalar(request, "stop", False, bool):
                    self.inbox.put(("stop", request.request_id(), sender))
                    continue
                ids, sp, streaming, exclude, end_id = self._parse(request)
            except lt.RequestError as e:
                sender.send(_error(str(e)), flags=FINAL)
                continue
            except Exception as e:  # malformed tensors: report, never crash the stub
                sender.send(_error(f"tensorrt_llm: bad request: {type(e).__name__}: {e}"), flags=FINAL)
                continue
            a = _Active(sender, streaming, exclude, ids, end_id, request.request_id())
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
            except Exception as e:  # keep serving: fail the active requests, not the model
                for a in list(self.active.values()):
                    self._safe_send(a, _error(f"tensorrt_llm: engine error: {type(e).__name__}: {e}"), FINAL)
                    try:
                        self.rt.cancel(a.rid)
                    except Exception:
                        pass
                self.active.clear()
                self._reset_runtime()

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
                    a.rid = self.rt.add_request(a.prompt, sp)
                    self.active[a.rid] = a
                except ValueError as e:
                    self._safe_send(a, _error(f"tensorrt_llm: {e}"), FINAL)
            elif item[0] == "stop":
                _, triton_id, sender = item
                for a in list(self.active.values()):
                    if triton_id and a.triton_id == triton_id:
                        self.rt.cancel(a.rid)
                sender.send(flags=FINAL)
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

    def _safe_send(self, a, response=None, flags=0):
        try:
            if response is None:
                a.sender.send(flags=flags)
            else:
                a.sender.send(response, flags=flags)
        except Exception:
            pass  # the client is gone

    def _emit(self, o):
        a = self.active.get(o.request_id)
        if a is None:
            return
        new = list(o.token_ids)
        if o.finished and o.finish_reason == "stop" and new and a.end_id is not None and new[-1] == a.end_id:
            new = new[:-1]  # TRT-LLM does not return end_id
        a.output += new
        if a.streaming:
            if new and not o.finished:
                self._safe_send(a, _ids_response(new))
            elif o.finished:
                if new:
                    self._safe_send(a, _ids_response(new), FINAL)
                else:
                    self._safe_send(a, None, FINAL)
        elif o.finished:
            ids = a.output if a.exclude else a.prompt + a.output
            self._safe_send(a, _ids_response(ids), FINAL)
        if o.finished:
            self.active.pop(o.request_id, None)
            _log(f"tensorrt_llm: request {a.triton_id or o.request_id!r} finished ({o.finish_reason}) after "
                 f"{len(a.output)} tokens; peak in-flight batch {a.peak}")

    def finalize(self):
        self.stop_flag.set()
        self.thread.join(timeout=5)
