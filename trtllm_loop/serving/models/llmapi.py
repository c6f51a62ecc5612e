"""Triton `tensorrt_llm` for the `llmapi` flavour: TensorRT-LLM's PyTorch backend through the LLM API
(``tensorrt_llm.LLM``, configured by ``1/model.yaml``) behind the same tensor contract as the C++ backend, so
`ensemble` / `tensorrt_llm_bls` work unchanged. GPU only (NGC ``*-trtllm-python-py3`` container); it cannot
be exercised on a CPU-only machine except with the API double standing in for TensorRT-LLM.

* ``model.yaml``: ``tensorrt_llm.LLM(**kwargs)`` arguments plus ``triton_config`` (``register_module``: imported
  first so the Loop architecture is registered out of tree);
* token ids in, token ids out (``detokenize=False``); streaming = one response per new token batch;
* ``end_id`` not returned, stop sequences returned (TRT-LLM semantics); cancellation by client cancel or by
  a ``stop=true`` request with the same request id (``RequestOutput.abort()``);
* before ``tensorrt_llm`` is imported, ``OMPI_*`` / ``PMIX_*`` variables inherited from another MPI job are
  cleared (else MPI start-up in TRT-LLM tries to join that job); when this Triton is itself one rank of an
  ``mpirun`` world of ``tensor_parallel_size x pipeline_parallel_size`` ranks (TRT-LLM's
  ``launch_triton_server.py --world_size N``), rank 0 hands ``LLM`` an ``MpiCommSession`` over ``COMM_WORLD`` and
  the other ranks serve as its workers (``MPICommExecutor``), as TRT-LLM's llmapi model does
  (``triton_backend/all_models/llmapi/tensorrt_llm/1/model.py`` @b35ac1b, ``initialize``);
* ``tensorrt_llm`` is found by ``trtllm_loop.trtllm.compat.ensure_tensorrt_llm``: the real package, or, only where
  it is not installed (CPU CI), the API double (logged);
* cancellation is polled every ``triton_config.cancellation_check_period_ms`` (default 100, upstream's key), not
  only when a token arrives; a ``stop`` that arrives before generation started is kept;
* requests are parsed by ``loop_contract`` (the rules of every model); inputs this model cannot honour (beams,
  several sequences, log probs / logits, bad words, embedding bias) are refused by name, never ignored;
* upstream's LLM-API request contract is accepted too (``triton_backend/all_models/llmapi/tensorrt_llm/
  config.pbtxt``, ``1/helpers.py``): ``text_input`` + ``sampling_param_*`` + ``streaming`` in, ``text_output`` (+
  ``finish_reason`` / ``stop_reason`` when asked) out. The text is tokenized and detokenized here (the same code
  as ``tensorrt_llm_bls``: ``loop_text``), so LLM gets token ids either way; stop strings follow the one stop-word
  rule (the returned text ends with the stop word, ``loop_text.STOP_WORD_INCLUDED``); streamed ``text_output`` is
  the text so far, as upstream's (``CompletionOutput.text``); the prompt is echoed in a non-streamed answer
  unless ``sampling_param_exclude_input_from_output`` (upstream's default: false);
* a batch (``input_ids`` / ``text_input`` ``[batch, ...]``) is served prompt by prompt by ``rq.BatchResponder``'s
  rule (decoupled: one result per prompt, tagged by ``batch_index``; else one response of the stacked rows), never
  flattened into one prompt (upstream's model takes one prompt: "JIRA-4496").
"""
import asyncio
import importlib
import json
import os
import sys
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import loop_contract as rq  # rendered repository: 1/loop_contract.py
    import loop_text as lt
except ImportError:  # pragma: no cover - running from the source tree
    from trtllm_loop.serving import contract as rq
    from trtllm_loop.serving import textproc as lt

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# tensorrt_llm inputs this model does not pass on (one output sequence, token ids only; rq.LLMRequest.features)
UNSUPPORTED = ("beam_width", "num_return_sequences", *rq.RETURN_FLAGS, "embedding_bias", "bad_words_list")
MPI_ENV_PREFIXES = ("OMPI_", "PMIX_")
CANCEL_CHECK_MS = 100  # upstream llmapi model.py: cancellation_check_period_ms default


def _ids_parts(ids, index=None):
    out = [("output_ids", np.array(ids, dtype=np.int32).reshape(1, 1, len(ids))),
           ("sequence_length", np.array([[len(ids)]], dtype=np.int32))]
    return out + ([("batch_index", np.array([[index]], dtype=np.int32))] if index is not None else [])


def _text_parts(text, spec, reason=None, stop_reason=None, index=None):
    """upstream's LLM-API outputs (``_create_response``): text_output, and the asked-for finish_reason /
    stop_reason as strings (``str(None)`` while running, as upstream sends them)."""
    out = [("text_output", np.array([text.encode("utf-8")], dtype=object))]
    for flag, value in (("return_finish_reason", reason), ("return_stop_reason", stop_reason)):
        if flag in spec["outputs"]:
            out.append((rq.LLMAPI_OUTPUTS[flag], np.array([str(value).encode("utf-8")], dtype=object)))
    return out + ([("batch_index", np.array([[index]], dtype=np.int32))] if index is not None else [])


def _build(parts):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in parts])


def _error(msg):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))


def _log(msg, error=False):
    try:
        (pb_utils.Logger.log_error if error else pb_utils.Logger.log_info)(msg)
    except Exception:  # the stand-in pb_utils of unit tests has no Logger
        pass


def world_size(kwargs) -> int:
    """Ranks the LLM runs on: ``tensor_parallel_size x pipeline_parallel_size`` of model.yaml."""
    return int(kwargs.get("tensor_parallel_size") or 1) * int(kwargs.get("pipeline_parallel_size") or 1)


def prepare_mpi_env(environ, world: int) -> str:
    """Decide how the LLM meets MPI, before ``tensorrt_llm`` (which starts MPI) is imported. Returns ``"comm"``
    when this process is one rank of an ``mpirun`` world of exactly ``world`` ranks (``OMPI_COMM_WORLD_SIZE``):
    the variables describe that world and stay. Otherwise they were inherited from another job (a shell inside
    ``mpirun``/Slurm): every ``OMPI_*`` / ``PMIX_*`` is removed and ``"own"`` returned (one process, or TRT-LLM
    spawns its own MPI workers for world > 1). A launch whose rank count differs from model.yaml is refused."""
    launched = int(environ.get("OMPI_COMM_WORLD_SIZE") or 0)
    if launched > 1 and launched != world:
        raise ValueError(f"model.yaml: tensor_parallel_size x pipeline_parallel_size = {world}, but this Triton is "
                         f"one of {launched} MPI ranks (OMPI_COMM_WORLD_SIZE): launch {world} ranks "
                         f"(launch_triton_server.py --world_size {world}) or fix model.yaml")
    if world > 1 and launched == world:
        return "comm"
    names = sorted(k for k in environ if k.startswith(MPI_ENV_PREFIXES))
    for k in names:
        del environ[k]
    if names:
        _log(f"tensorrt_llm (llmapi): cleared {len(names)} inherited MPI variables ({', '.join(names[:4])}"
             f"{', ...' if len(names) > 4 else ''}) before importing tensorrt_llm")
    return "own"


class _Job:
    """One Triton request's state (all its prompts), registered under its request id before generation starts,
    so that a ``stop`` (or a client cancel) arriving at any time is honoured."""

    def __init__(self, prompts: int = 1):
        self.results: list = []
        self.stopped = False
        self.left = prompts

    def stop(self):
        self.stopped = True
        for r in self.results:
            r.abort()


class _Text:
    """The text side of one LLM-API prompt: incremental detokenization and the stop-word rule over the
    cumulative token ids the LLM streams (``loop_text``, as in tensorrt_llm_bls)."""

    def __init__(self, model, spec):
        self.tok, self.job = model.pre.tok, spec["text"]
        self.detok = lt.IncrementalDetokenizer(self.tok, skip_special_tokens=model.skip_special)
        self.matcher = lt.StopStringMatcher(self.job["stop_words"])
        self.echo = "" if spec["streaming"] or spec["exclude"] else self.job["prompt"]
        self.text, self.seen, self.sent_len, self.matcher_word = "", 0, 0, None

    def feed(self, tokens) -> bool:
        """Take the ids so far; True when a stop word has ended the text."""
        new, self.seen = tokens[self.seen:], max(self.seen, len(tokens))
        self.text += self.matcher.feed(self.detok.push(new))
        if self.matcher.stopped:
            self.matcher_word = next((w for w in self.job["stop_words"] if w and self.text.endswith(w)), None)
        return self.matcher.stopped

    def changed(self) -> bool:
        grew = len(self.text) > self.sent_len
        self.sent_len = len(self.text)
        return grew

    def tok_text(self, seq) -> str:
        return next((w for w in self.job["stop_words"] if lt.encode(self.tok, w) == list(seq)), None) or \
            self.tok.decode(list(seq))

    def whole(self, final: bool) -> str:
        if final and not self.matcher.stopped:
            self.text += self.matcher.feed(self.detok.flush()) + self.matcher.flush()
        return self.echo + self.text


class TritonPythonModel:
    def initialize(self, args):
        import yaml

        params = lt.parameters(json.loads(args["model_config"]))
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.environ.get("LLM_CONFIG_PATH") or os.path.join(here, params.get("llm_config") or "model.yaml")
        with open(path, encoding="utf-8") as f:
            kwargs = yaml.safe_load(f)
        triton_cfg = kwargs.pop("triton_config", {}) or {}
        self.cancel_period_s = int(triton_cfg.get("cancellation_check_period_ms", CANCEL_CHECK_MS)) / 1000.0
        self.by_id: dict = {}
        self.llm = None
        mode = prepare_mpi_env(os.environ, world_size(kwargs))
        self._import_path(kwargs.get("model"))
        trt = self._tensorrt_llm()
        if triton_cfg.get("register_module"):
            importlib.import_module(triton_cfg["register_module"])
        from tensorrt_llm.llmapi import KvCacheConfig

        if mode == "comm":
            from mpi4py.MPI import COMM_WORLD

            if COMM_WORLD.Get_rank() != 0:  # a worker of rank 0's LLM until it shuts down (upstream model.py)
                from mpi4py.futures import MPICommExecutor

                _log(f"tensorrt_llm (llmapi): rank {COMM_WORLD.Get_rank()} serves as a worker of rank 0")
                with MPICommExecutor(COMM_WORLD) as executor:
                    if executor is not None:
                        raise RuntimeError(f"rank {COMM_WORLD.Get_rank()} must not hold the MPI executor")
                return
            from tensorrt_llm.llmapi import MpiCommSession

            kwargs["_mpi_session"] = MpiCommSession(comm=COMM_WORLD, n_workers=COMM_WORLD.Get_size())
        if isinstance(kwargs.get("kv_cache_config"), dict):
            kwargs["kv_cache_config"] = KvCacheConfig(**kwargs["kv_cache_config"])
        self.SamplingParams = trt.SamplingParams
        self.decoupled = bool(((json.loads(args["model_config"]).get("model_transaction_policy") or {})
                               .get("decoupled", triton_cfg.get("decoupled", True))))
        # upstream's LLM-API contract (text in, text out) needs the tokenizer; without one it is refused by name
        self.pre = lt.preprocessor_from_params(params) if params.get("tokenizer_dir") else None
        self.skip_special = (params.get("skip_special_tokens") or "true").lower() == "true"
        self.llm = trt.LLM(**kwargs)
        self.default_exclude = (params.get("exclude_input_in_output") or "false").lower() == "true"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="llmapi-loop", daemon=True)
        self.thread.start()

    @staticmethod
    def _import_path(model):
        """``trtllm_loop`` from this interpreter, else the copy in the deploy directory (``<model>/python``)."""
        try:
            import trtllm_loop  # noqa: F401
        except ImportError:
            copy = os.path.join(str(model or ""), "python")
            if os.path.isdir(os.path.join(copy, "trtllm_loop")):
                sys.path.insert(0, copy)

    @staticmethod
    def _tensorrt_llm():
        try:
            from trtllm_loop.trtllm.compat import ensure_tensorrt_llm
        except ImportError:  # no trtllm_loop: the real package only
            import tensorrt_llm as trt
            return trt
        trt, is_double = ensure_tensorrt_llm()
        if is_double:
            _log("tensorrt_llm (llmapi): TensorRT-LLM is not installed; serving with trtllm-loop's API double "
                 "(CPU, greedy; for tests), not TensorRT-LLM", error=True)
        return trt

    def execute(self, requests):
        for request in requests:  # each request answers for itself: a bad one never touches the others
            sender = request.get_response_sender()
            try:
                if self.llm is None:
                    raise rq.RequestError("this rank is an MPI worker of rank 0; send requests to rank 0")
                inp = rq.Inputs.of(request, pb_utils)
                if rq.is_stop(inp):
                    job = self.by_id.get(request.request_id())
                    if job is not None:
                        job.stop()
                    sender.send(None if self.decoupled else _build(_ids_parts([])), flags=FINAL)
                    continue
                if rq.is_llmapi_request(inp):
                    specs = [self._text_job(r) for r in self._llmapi_requests(inp)]
                else:
                    specs = [self._job(r) for r in rq.parse_llm_requests(inp, default_exclude=self.default_exclude)]
                if any(sp["streaming"] for sp in specs) and not self.decoupled:
                    raise rq.RequestError("streaming=true needs the decoupled tensorrt_llm model: render the "
                                          "repository with `trtllm-loop triton-repo --decoupled true`")
            except Exception as e:
                sender.send(_error(rq.error_text(e, "tensorrt_llm (llmapi)")), flags=FINAL)
                continue
            job, tid = _Job(len(specs)), request.request_id()
            if tid:
                self.by_id[tid] = job
            group = rq.BatchResponder(sender, len(specs), FINAL, _build, merge=not self.decoupled)
            asyncio.run_coroutine_threadsafe(self._watch(sender, job), self.loop)
            for b, spec in enumerate(specs):
                spec["index"] = b if len(specs) > 1 else None
                asyncio.run_coroutine_threadsafe(self._generate(spec, job, group, tid), self.loop)
        return None

    def _llmapi_requests(self, inp):
        if self.pre is None:
            raise rq.RequestError("text_input needs the tokenizer, and this repository was rendered without "
                                  "tokenizer_dir: re-render it with `trtllm-loop triton-repo`, or send input_ids")
        return rq.parse_llmapi_requests(inp, max_output_len=self.pre.max_output_len,
                                        default_exclude=self.default_exclude,
                                        max_prompt_bytes=self.pre.max_prompt_bytes)

    def _sampling(self, sampling, max_tokens, end_id, pad_id, stop_words):
        single = [s[0] for s in stop_words if len(s) == 1]
        options = {k: v for k, v in sampling.given().items() if k not in ("beam_width", "num_return_sequences")}
        kw = dict(options, max_tokens=max_tokens, end_id=end_id, pad_id=pad_id,
                  stop_token_ids=single or None, detokenize=False)
        return self.SamplingParams(**{k: v for k, v in kw.items() if v is not None})

    def _job(self, req):
        req.reject(UNSUPPORTED, "the llmapi tensorrt_llm model")
        return {"ids": req.input_ids, "sp": self._sampling(req.sampling, req.output_len, req.end_id, req.pad_id,
                                                           req.stop_words),
                "end_id": req.end_id, "max_tokens": req.output_len,
                "multi_stops": [s for s in req.stop_words if len(s) > 1],
                "streaming": req.streaming, "exclude": req.exclude_input, "text": None}

    def _text_job(self, r):
        """An upstream LLM-API request: tokenized by the same Preprocessor as tensorrt_llm_bls."""
        req = r.text
        for flag, why in (("return_cumulative_logprob", "log probs"),):
            if flag in r.outputs:
                raise rq.RequestError(f"{flag} is not supported by the llmapi tensorrt_llm model ({why} are not "
                                      "returned): leave it unset")
        if req.returns:
            raise rq.RequestError(f"sampling_param_{req.returns[0]} is not supported by the llmapi tensorrt_llm "
                                  "model: leave it unset")
        job = self.pre.prepare(req)
        seqs = rq.from_word_list(job["stop_words_list"])
        return {"ids": job["input_ids"], "end_id": job["end_id"], "max_tokens": job["max_tokens"],
                "sp": self._sampling(req.sampling, job["max_tokens"], job["end_id"], job["pad_id"], seqs),
                "multi_stops": [s for s in seqs if len(s) > 1], "streaming": req.stream,
                "exclude": req.exclude_input, "text": job, "outputs": r.outputs}

    async def _watch(self, sender, job):
        """Upstream's cancellation loop: poll ``is_cancelled()`` every ``cancellation_check_period_ms``, from the
        moment the request arrives (a cancel before the first token is kept)."""
        while job.left > 0 and not job.stopped:
            await asyncio.sleep(self.cancel_period_s)
            if job.left > 0 and sender.is_cancelled():
                job.stop()

    async def _generate(self, spec, job, group, triton_id):
        tokens: list[int] = []
        reason, stop_reason = "length", None
        index = spec["index"]
        text = _Text(self, spec) if spec["text"] is not None else None

        def send(last=False):
            if text is None:
                ids = tokens if (spec["streaming"] or spec["exclude"]) else spec["ids"] + tokens
                group.send(parts=_ids_parts(ids[sent:] if spec["streaming"] else ids, index), last=last, index=b)
            else:
                group.send(parts=_text_parts(text.whole(final=last), spec, reason if last else None,
                                             stop_reason if last else None, index), last=last, index=b)

        b, sent = index or 0, 0
        try:
            if job.stopped:  # a stop arrived before generation began
                reason = "cancelled"
                group.send(last=True, index=b)
                return
            result = self.llm.generate_async({"prompt_token_ids": spec["ids"]}, spec["sp"],
                                             streaming=spec["streaming"])
            job.results.append(result)
            if job.stopped:  # a stop arrived while the request was being handed to the LLM
                result.abort()
            async for out in result:
                if job.stopped:
                    reason = "cancelled"
                    break
                tokens = list(out.outputs[0].token_ids)
                if spec["end_id"] is not None and tokens and tokens[-1] == spec["end_id"]:
                    tokens, reason = tokens[:-1], "stop"
                if text is not None and text.feed(tokens):  # a stop string (text level, BLS's rule)
                    hit, stop_reason = True, text.matcher_word
                else:
                    hit = next((s for s in spec["multi_stops"] if tokens[-len(s):] == s), None)
                    if hit is not None:
                        stop_reason = text.tok_text(hit) if text is not None else hit
                if hit is not None:
                    result.abort()
                    reason = "stop"
                if spec["streaming"] and len(tokens) > sent and (text is None or text.changed()):
                    send()
                    sent = len(tokens)
                if hit is not None:
                    break
            if job.stopped:
                reason = "cancelled"
            elif reason == "length" and len(tokens) < spec["max_tokens"]:
                reason = "stop"  # a single-token stop word (stop_token_ids) ended it
                stop_reason = tokens[-1] if tokens else None
            if reason == "cancelled":
                group.send(last=True, index=b)
            elif spec["streaming"] and text is None:
                group.send(last=True, index=b)
            else:
                send(last=True)
        except Exception as e:
            reason = "error"
            _log(f"tensorrt_llm (llmapi): request {triton_id!r}: {type(e).__name__}: {e}", error=True)
            group.send(_error(f"tensorrt_llm (llmapi): {type(e).__name__}: {e}"), last=True, index=b)
        finally:
            job.left -= 1
            if job.left == 0 and triton_id and self.by_id.get(triton_id) is job:
                self.by_id.pop(triton_id, None)
            _log(f"tensorrt_llm (llmapi): request '{triton_id}'{'' if spec['index'] is None else f' prompt {b}'} "
                 f"finished ({reason}) after {len(tokens)} tokens")

    def finalize(self):
        if getattr(self, "llm", None) is None:
            return
        try:
            self.llm.shutdown()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
