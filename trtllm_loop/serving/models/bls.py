"""Triton `tensorrt_llm_bls`: the client contract of `ensemble`, with exact streaming.

Per request (each on a worker thread, so requests run concurrently and batch in `tensorrt_llm`):
tokenize + chat template in process (same code as `preprocessing`) -> `tensorrt_llm` via BLS, always streamed
internally -> incremental detokenization (whole UTF-8 characters, SentencePiece spaces kept) -> text-level
stop strings (the output ends just before the first match) -> streamed deltas or one final text. A client
cancel or a stop-string hit cancels the `tensorrt_llm` request (TRT-LLM's `stop` request, same request id).
The concatenation of the streamed deltas equals the non-streamed text.
"""
import json
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

def _text(s: str):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([[s.encode("utf-8")]], dtype=object))])


def _error(msg: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))


class TritonPythonModel:
    def initialize(self, args):
        params = lt.parameters(json.loads(args["model_config"]))
        self.pre = lt.preprocessor_from_params(params)
        self.tok = self.pre.tok
        self.skip_special = (params.get("skip_special_tokens") or "true").lower() == "true"
        self.llm = params.get("tensorrt_llm_model_name") or "tensorrt_llm"
        self.default_exclude = (params.get("exclude_input_in_output") or "false").lower() == "true"
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_concurrency") or 64),
                                       thread_name_prefix="bls")

    def execute(self, requests):
        for request in requests:  # each request answers for itself: a bad one never touches the others
            sender = request.get_response_sender()
            try:
                job = self._prepare(rq.Inputs.of(request, pb_utils))
            except Exception as e:
                sender.send(_error(rq.error_text(e, "tensorrt_llm_bls")), flags=FINAL)
                continue
            job["request_id"] = f"bls-{request.request_id() or ''}-{uuid.uuid4().hex[:12]}"
            self.pool.submit(self._run_safe, job, sender)
        return None

    # ------------------------------------------------------------------ request -> job
    def _prepare(self, inp):
        req = rq.parse_text_request(inp, max_output_len=self.pre.max_output_len, default_exclude=self.default_exclude)
        job = self.pre.prepare(req)
        job["stream"], job["exclude"] = req.stream, req.exclude_input
        job["passthrough"] = req.sampling.llm_tensors()
        if req.return_log_probs is not None:
            job["passthrough"]["return_log_probs"] = np.array([[req.return_log_probs]], dtype=np.bool_)
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
            pb_utils.Tensor("streaming", np.array([[True]], dtype=np.bool_)),
            pb_utils.Tensor("exclude_input_in_output", np.array([[True]], dtype=np.bool_)),
        ]
        if job["bad_words_list"][1, 0] >= 0:
            tensors.append(pb_utils.Tensor("bad_words_list", job["bad_words_list"][None]))
        tensors += [pb_utils.Tensor(name, arr) for name, arr in job["passthrough"].items()]
        return pb_utils.InferenceRequest(model_name=self.llm, inputs=tensors, request_id=request_id,
                                         requested_output_names=["output_ids", "sequence_length"])

    def _cancel_llm(self, request_id):
        stop = pb_utils.InferenceRequest(
            model_name=self.llm, request_id=request_id, requested_output_names=["output_ids"],
            inputs=[pb_utils.Tensor("input_ids", np.array([[0]], dtype=np.int32)),
                    pb_utils.Tensor("input_lengths", np.array([[1]], dtype=np.int32)),
                    pb_utils.Tensor("request_output_len", np.array([[1]], dtype=np.int32)),
                    pb_utils.Tensor("stop", np.array([[True]], dtype=np.bool_)),
                    pb_utils.Tensor("streaming", np.array([[True]], dtype=np.bool_))])
        for _ in stop.exec(decoupled=True):
            pass

    # ------------------------------------------------------------------ generation (worker thread)
    def _run_safe(self, job, sender):
        try:
            self._run(job, sender)
        except Exception as e:
            try:
                sender.send(_error(f"tensorrt_llm_bls: {type(e).__name__}: {e}"), flags=FINAL)
            except Exception:
                pass

    def _run(self, job, sender):
        request_id = job["request_id"]
        detok = lt.IncrementalDetokenizer(self.tok, skip_special_tokens=self.skip_special)
        matcher = lt.StopStringMatcher(job["stop_words"])
        pieces: list[str] = []

        def emit(s: str):
            if not s:
                return
            if job["stream"]:
                sender.send(_text(s))
            else:
                pieces.append(s)

        if not job["exclude"]:
            emit(detok.push(job["input_ids"]))
        cancelled = False
        last_check = time.monotonic()
        responses = self._llm_request(job, request_id).exec(decoupled=True)
        for resp in responses:
            if resp.has_error():
                sender.send(_error(resp.error().message()), flags=FINAL)
                return
            out = pb_utils.get_output_tensor_by_name(resp, "output_ids")
            if out is not None:
                ids = out.as_numpy().reshape(-1).tolist()
                n = pb_utils.get_output_tensor_by_name(resp, "sequence_length")
                if n is not None:
                    ids = ids[:int(np.asarray(n.as_numpy()).reshape(-1)[0])]
                emit(matcher.feed(detok.push(ids)))
            client_gone = False
            if time.monotonic() - last_check > 0.05:  # is_cancelled() is an IPC round trip: poll, not per token
                last_check = time.monotonic()
                client_gone = sender.is_cancelled()
            if matcher.stopped or client_gone:
                cancelled = True
                self._cancel_llm(request_id)
                for _ in responses:  # drain the cancelled stream
                    pass
                break
        if not cancelled or matcher.stopped:
            emit(matcher.feed(detok.flush()) + matcher.flush())
        if sender.is_cancelled():
            sender.send(flags=FINAL)
            return
        if job["stream"]:
            sender.send(flags=FINAL)
        else:
            sender.send(_text("".join(pieces)), flags=FINAL)

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
