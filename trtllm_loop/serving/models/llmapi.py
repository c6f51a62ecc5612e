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
  several sequences, log probs / logits, bad words, embedding bias) are refused by name, never ignored.
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


def _ids_response(ids):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int32).reshape(1, 1, len(ids))),
        pb_utils.Tensor("sequence_length", np.array([[len(ids)]], dtype=np.int32))])


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
    """One request's state, registered under its Triton request id before generation starts, so that a
    ``stop`` arriving at any time is honoured."""

    def __init__(self):
        self.result = None
        self.stopped = False

    def stop(self):
        self.stopped = True
        if self.result is not None:
            self.result.abort()


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
                    sender.send(flags=FINAL)
                    continue
                spec = self._job(rq.parse_llm_request(inp, default_exclude=self.default_exclude))
            except Exception as e:
                sender.send(_error(rq.error_text(e, "tensorrt_llm (llmapi)")), flags=FINAL)
                continue
            job, tid = _Job(), request.request_id()
            if tid:
                self.by_id[tid] = job
            asyncio.run_coroutine_threadsafe(self._generate(spec, job, sender, tid), self.loop)
        return None

    def _job(self, req):
        req.reject(UNSUPPORTED, "the llmapi tensorrt_llm model")
        single = [s[0] for s in req.stop_words if len(s) == 1]
        options = {k: v for k, v in req.sampling.given().items() if k not in ("beam_width", "num_return_sequences")}
        kw = dict(options, max_tokens=req.output_len, end_id=req.end_id, pad_id=req.pad_id,
                  stop_token_ids=single or None, detokenize=False)
        sp = self.SamplingParams(**{k: v for k, v in kw.items() if v is not None})
        return {"ids": req.input_ids, "sp": sp, "end_id": req.end_id, "max_tokens": req.output_len,
                "multi_stops": [s for s in req.stop_words if len(s) > 1],
                "streaming": req.streaming, "exclude": req.exclude_input}

    async def _watch(self, sender, job):
        """Upstream's cancellation loop: poll ``is_cancelled()`` every ``cancellation_check_period_ms``."""
        while not job.stopped:
            await asyncio.sleep(self.cancel_period_s)
            if sender.is_cancelled():
                job.stop()

    async def _generate(self, spec, job, sender, triton_id):
        tokens: list[int] = []
        reason, watch = "length", None
        try:
            if job.stopped:  # a stop arrived before generation began
                reason = "cancelled"
                sender.send(flags=FINAL)
                return
            job.result = result = self.llm.generate_async({"prompt_token_ids": spec["ids"]}, spec["sp"],
                                                          streaming=spec["streaming"])
            watch = asyncio.ensure_future(self._watch(sender, job))
            sent = 0
            async for out in result:
                if job.stopped:
                    reason = "cancelled"
                    break
                tokens = list(out.outputs[0].token_ids)
                if spec["end_id"] is not None and tokens and tokens[-1] == spec["end_id"]:
                    tokens, reason = tokens[:-1], "end_id"
                hit = next((len(tokens) for s in spec["multi_stops"] if tokens[-len(s):] == s), None)
                if hit is not None:
                    result.abort()
                    reason = "stop"
                if spec["streaming"] and len(tokens) > sent:
                    sender.send(_ids_response(tokens[sent:]))
                    sent = len(tokens)
                if hit is not None:
                    break
            if job.stopped:
                reason = "cancelled"
            elif reason == "length" and len(tokens) < spec["max_tokens"]:
                reason = "stop"  # a single-token stop word (stop_token_ids) ended it
            if spec["streaming"] or reason == "cancelled":
                sender.send(flags=FINAL)
            else:
                ids = tokens if spec["exclude"] else spec["ids"] + tokens
                sender.send(_ids_response(ids), flags=FINAL)
        except Exception as e:
            reason = "error"
            _log(f"tensorrt_llm (llmapi): request {triton_id!r}: {type(e).__name__}: {e}", error=True)
            sender.send(_error(f"tensorrt_llm (llmapi): {type(e).__name__}: {e}"), flags=FINAL)
        finally:
            job.stopped = True
            if watch is not None:
                watch.cancel()
            if triton_id:
                self.by_id.pop(triton_id, None)
            _log(f"tensorrt_llm (llmapi): request '{triton_id}' finished ({reason}) after {len(tokens)} tokens")

    def finalize(self):
        if self.llm is None:
            return
        try:
            self.llm.shutdown()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
