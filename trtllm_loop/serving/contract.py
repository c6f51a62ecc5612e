"""The request contract of every Triton Python model, parsed and validated in one place.

* :func:`parse_llm_request` -> :class:`LLMRequest`: the ``tensorrt_llm`` model's inputs, TensorRT-LLM's tensor
  contract (``triton_repo/common/tensorrt_llm_io.pbtxt``), read by the ``reference`` and ``llmapi`` models;
* :func:`parse_text_requests` / :func:`parse_text_request` -> :class:`TextRequest`: the client contract
  (``triton_repo/common/client_io.pbtxt``), read by ``tensorrt_llm_bls`` and, under the ensemble's tensor names
  (:data:`PREPROCESSING_NAMES`), by ``preprocessing``.

The same rules for every model:

* an error names the input tensor and the allowed values (:class:`RequestError`); it answers its own request
  only, the others of the same ``execute()`` batch go on (TensorRT-LLM's C++ backend does the same:
  ``triton_backend/inflight_batcher_llm/src/model_instance_state.cc``, ``enqueue``, one try/catch per request);
* a tensor of the wrong type is refused (integer inputs take integer tensors, ...), and a scalar input holds
  exactly one value per prompt (``get_input_scalar_by_name`` in
  ``triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/1/model.py``: "Expected a scalar tensor");
* a request may carry a batch of prompts (``text_input`` / ``input_ids`` ``[batch, ...]``, every other input one
  row per prompt): ``tensorrt_llm`` (reference and llmapi) and ``tensorrt_llm_bls`` serve it by
  :class:`BatchResponder` (decoupled: one result per prompt, tagged by ``batch_index``; not decoupled: one response
  of the prompts' stacked rows), ``preprocessing`` returns one row per prompt; one bad row fails its whole request;
* the llmapi ``tensorrt_llm`` also takes upstream's LLM-API contract (:func:`parse_llmapi_requests`: ``text_input``,
  ``sampling_param_*``), parsed by the client contract's rules under upstream's names;
* ``input_lengths`` must be 1..len(input_ids): a shorter value trims the row's padding (upstream's
  ``convert_request`` slices ``input_token_ids[0:input_length]``), a longer one is refused rather than silently
  sliced to the ids there are -- it means the two tensors disagree;
* sampling values are checked once, by :data:`SAMPLING` (ranges as in ``tensorrt_llm/sampling_params.py``
  ``SamplingParams._validate``, except that ``top_p`` 0 is refused instead of meaning "off", and NaN / inf are
  refused everywhere).

Copied verbatim into every rendered Python model as ``1/loop_contract.py`` (beside ``loop_text.py``), so it
imports only numpy and the standard library.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

MAX_STOP_WORDS = 64


class RequestError(ValueError):
    """A bad request; the message names the input tensor and the fix. Sent back as the Triton error."""


MAX_ERROR_CHARS = 500


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters: what a client is ever shown of an error."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def error_text(exc: BaseException, model: str, log: Callable[[str], None] | None = None) -> str:
    """The one-line error a model answers a failed request with: ours (:class:`RequestError`) verbatim, anything
    else as ``model: internal error (Type: first line)`` -- never a traceback; the full trace goes to ``log``
    (the server log) when given."""
    if isinstance(exc, RequestError):
        return one_line(str(exc))
    if log is not None:
        import traceback

        try:
            log(f"{model}: {''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))}")
        except Exception:  # pragma: no cover - logging must never fail a request
            pass
    first = str(exc).splitlines()[0] if str(exc) else ""
    return one_line(f"{model}: internal error ({type(exc).__name__}{': ' + first if first else ''}); "
                    "the server log has the details")


def error_response(pb_utils, exc: BaseException, model: str, log: Callable[[str], None] | None = None):
    """A Triton error response for ``exc``: INVALID_ARG (HTTP 400) for a bad request, INTERNAL otherwise."""
    te = pb_utils.TritonError
    code = getattr(te, "INVALID_ARG" if isinstance(exc, RequestError) else "INTERNAL", None)
    msg = error_text(exc, model, log)
    try:
        return pb_utils.InferenceResponse(error=te(msg) if code is None else te(msg, code))
    except TypeError:  # pragma: no cover - a backend without error codes
        return pb_utils.InferenceResponse(error=te(msg))


# ----------------------------------------------------------------------------- tensor access
class Inputs:
    """The input tensors of one Triton request as numpy arrays (an absent optional input is ``None``).

    ``names`` maps a contract input to the model's own tensor name (the preprocessing's ``QUERY`` is the
    client's ``text_input``); errors always use the contract name, the one the client sent."""

    def __init__(self, tensors: Mapping[str, Any] | Callable[[str], Any], names: Mapping[str, str] | None = None):
        self._get = tensors if callable(tensors) else tensors.get
        self._names = dict(names or {})

    @classmethod
    def of(cls, request, pb_utils, names: Mapping[str, str] | None = None) -> "Inputs":
        def get(name):
            t = pb_utils.get_input_tensor_by_name(request, name)
            return None if t is None else t.as_numpy()
        return cls(get, names)

    def get(self, name: str):
        a = self._get(self._names.get(name, name))
        return None if a is None else np.asarray(a)


# contract input -> Triton type and the numpy dtype kinds it accepts
_TYPES = {int: ("INT32", "iu"), float: ("FP32", "fiu"), bool: ("BOOL", "b"), str: ("STRING", "OSU")}


def decode_utf8(value, name: str) -> str:
    """A STRING tensor element (bytes) as text; invalid UTF-8 is a client error naming the input."""
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{name} is not valid UTF-8 ({e.reason} at byte offset {e.start}): "
                           f"send the text UTF-8 encoded") from None


def tensor(inp: Inputs, name: str, kind: type):
    """The input as an array of the right kind, or None when absent."""
    a = inp.get(name)
    if a is not None and a.dtype.kind not in _TYPES[kind][1]:
        raise RequestError(f"{name} must be a tensor of {_TYPES[kind][0]}, got {a.dtype}")
    return a


def _convert(v, kind: type, name: str):
    if kind is str:
        return decode_utf8(v, name)
    return kind(v.item() if hasattr(v, "item") else v)


def scalars(inp: Inputs, name: str, kind: type, batch: int = 1) -> list:
    """One value per prompt (``[batch]`` / ``[batch, 1]``); ``[None] * batch`` when the input is absent."""
    a = tensor(inp, name, kind)
    if a is None:
        return [None] * batch
    if a.size != batch:
        raise RequestError(f"{name} must hold one value per prompt (shape [{batch}, 1]), got shape {list(a.shape)}")
    return [_convert(v, kind, name) for v in a.reshape(-1)]


def scalar(inp: Inputs, name: str, kind: type, default=None):
    """The one value of a one-prompt request's scalar input, or ``default`` when absent."""
    v = scalars(inp, name, kind)[0]
    return default if v is None else v


def rows(inp: Inputs, name: str, kind: type, batch: int, row_ndim: int = 1) -> list:
    """A list input split into one row per prompt: ``[batch, *row]``, or just ``row`` for one prompt."""
    a = tensor(inp, name, kind)
    if a is None:
        return [None] * batch
    if a.ndim == row_ndim + 1 and a.shape[0] == batch:
        return list(a)
    if a.ndim == row_ndim and batch == 1:
        return [a]
    raise RequestError(f"{name} must have one row per prompt (shape [{batch}, ...]), got shape {list(a.shape)}")


def string_list(arr, name: str) -> list[str]:
    """A STRING row -> its words (empty strings dropped), at most :data:`MAX_STOP_WORDS`."""
    if arr is None:
        return []
    words = [decode_utf8(v, name) for v in np.asarray(arr, dtype=object).reshape(-1)]
    words = [w for w in words if w != ""]
    if len(words) > MAX_STOP_WORDS:
        raise RequestError(f"{name} has {len(words)} entries; at most {MAX_STOP_WORDS} are allowed")
    return words


# ----------------------------------------------------------------------------- TRT-LLM word lists
def to_word_list(sequences: list[list[int]]) -> np.ndarray:
    """TRT-LLM ``[2, N]`` format: row 0 = concatenated ids, row 1 = cumulative end offsets, padded with -1."""
    flat: list[int] = []
    offsets: list[int] = []
    for s in sequences:
        flat += [int(t) for t in s]
        offsets.append(len(flat))
    n = max(len(flat), 1)
    out = np.full((2, n), -1, dtype=np.int32)
    out[0, :len(flat)] = flat
    out[1, :len(offsets)] = offsets
    return out


def from_word_list(arr, name: str = "stop/bad words list") -> list[list[int]]:
    """Inverse of :func:`to_word_list` (accepts ``[1, 2, N]`` or ``[2, N]``)."""
    if arr is None:
        return []
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.shape[0] != 2:
        raise RequestError(f"{name} must have shape [2, N] (ids row, offsets row), got {list(a.shape)}")
    ids, offs = a[0].tolist(), [int(o) for o in a[1].tolist() if o >= 0]
    seqs, start = [], 0
    for end in offs:
        if end > len(ids):
            raise RequestError(f"{name} has an offset {end} past its {len(ids)} ids: offsets are cumulative ends")
        if end > start:
            seqs.append([int(t) for t in ids[start:end]])
        start = end
    return seqs


def output_token_rows(tokens, lengths, vocab_size: int | None = None) -> list[list[list[int]]]:
    """``postprocessing``'s ``TOKENS_BATCH`` ``[batch, beams, T]`` (or ``[batch, T]``) cut to ``SEQUENCE_LENGTH``:
    ids per prompt per beam; ids outside the vocabulary are refused by name (never an OverflowError)."""
    if tokens is None or lengths is None:
        raise RequestError("TOKENS_BATCH and SEQUENCE_LENGTH are both required")
    t, n = np.asarray(tokens), np.asarray(lengths)
    if t.dtype.kind not in "iu" or n.dtype.kind not in "iu":
        raise RequestError(f"TOKENS_BATCH and SEQUENCE_LENGTH must be INT32 tensors, got {t.dtype}, {n.dtype}")
    if t.ndim == 2:  # [batch, tokens] without a beam axis
        t = t[:, None, :]
    if t.ndim != 3:
        raise RequestError(f"TOKENS_BATCH must have shape [batch, beams, tokens], got {list(t.shape)}")
    n = n.reshape(t.shape[0], -1) if n.size else np.zeros((t.shape[0], 0), np.int64)
    out = []
    for b in range(t.shape[0]):
        beams = []
        for beam in range(t.shape[1]):
            k = int(n[b, beam]) if beam < n.shape[1] else t.shape[2]
            if not 0 <= k <= t.shape[2]:
                raise RequestError(f"SEQUENCE_LENGTH {k} is outside [0, {t.shape[2]}] (the tokens sent)")
            ids = [int(x) for x in t[b, beam, :k]]
            bad = next((x for x in ids if x < 0 or (vocab_size and x >= vocab_size)), None)
            if bad is not None:
                raise RequestError(f"TOKENS_BATCH contains {bad}, outside the vocabulary "
                                   f"[0, {vocab_size or 'vocab_size'})")
            beams.append(ids)
        out.append(beams)
    return out


# ----------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class _Option:
    name: str                    # client input and :class:`Sampling` attribute (and LLM-API SamplingParams name)
    llm: str                     # tensorrt_llm input
    kind: type
    dtype: type                  # numpy dtype of the tensorrt_llm tensor
    rule: str                    # the allowed values, for the error message
    ok: Callable[[Any], bool]
    off: tuple | None = None     # values that leave the feature off (None: every backend has it)


SAMPLING = (
    _Option("temperature", "temperature", float, np.float32, ">= 0 (0 = greedy)", lambda v: 0 <= v < math.inf),
    _Option("top_k", "runtime_top_k", int, np.int32, ">= 0 (0 = off)", lambda v: v >= 0),
    _Option("top_p", "runtime_top_p", float, np.float32, "in (0, 1] (1 = off)", lambda v: 0 < v <= 1),
    _Option("seed", "seed", int, np.uint64, ">= 0", lambda v: v >= 0),
    _Option("length_penalty", "len_penalty", float, np.float32, "a finite number", math.isfinite),
    _Option("repetition_penalty", "repetition_penalty", float, np.float32, "> 0 (1 = off)",
            lambda v: 0 < v < math.inf, (1.0,)),
    _Option("presence_penalty", "presence_penalty", float, np.float32, "a finite number (0 = off)", math.isfinite,
            (0.0,)),
    _Option("frequency_penalty", "frequency_penalty", float, np.float32, "a finite number (0 = off)", math.isfinite,
            (0.0,)),
    _Option("min_tokens", "min_tokens", int, np.int32, ">= 0", lambda v: v >= 0, (0, 1)),
    _Option("beam_width", "beam_width", int, np.int32, ">= 1", lambda v: v >= 1, (1,)),
    _Option("num_return_sequences", "num_return_sequences", int, np.int32, ">= 1", lambda v: v >= 1, (1,)),
)


@dataclass(frozen=True)
class Sampling:
    """The sampling inputs a request set (``None``: unset, the backend's default)."""
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    length_penalty: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    beam_width: int | None = None
    num_return_sequences: int | None = None

    @classmethod
    def parse(cls, inp: Inputs, batch: int = 1, llm: bool = True) -> list["Sampling"]:
        """One per prompt, from the ``tensorrt_llm`` inputs (``llm``) or the client's."""
        per = {}
        for o in SAMPLING:
            name = o.llm if llm else o.name
            values = scalars(inp, name, o.kind, batch)
            for v in values:
                if v is not None and not o.ok(v):
                    alias = f" (the client's {o.name})" if name != o.name else ""
                    raise RequestError(f"{name} must be {o.rule}, got {_show(v)}{alias}")
            per[o.name] = values
        return [cls(**{k: v[b] for k, v in per.items()}) for b in range(batch)]

    def given(self) -> dict:
        """The options that were set, by :class:`Sampling` name."""
        return {o.name: getattr(self, o.name) for o in SAMPLING if getattr(self, o.name) is not None}

    def llm_tensors(self) -> dict[str, np.ndarray]:
        """The options that were set as ``tensorrt_llm`` input tensors (``[1, 1]``), for a BLS request."""
        return {o.llm: np.array([[getattr(self, o.name)]], dtype=o.dtype) for o in SAMPLING
                if getattr(self, o.name) is not None}


def _show(v):
    return f"{v:g}" if isinstance(v, float) else v


# ----------------------------------------------------------------------------- tensorrt_llm requests
RETURN_FLAGS = ("return_log_probs", "return_context_logits", "return_generation_logits", "return_perf_metrics")
# tensorrt_llm inputs no Python flavour implements (the C++ backend does): refused by every LLMRequest.reject(),
# each with why and what to do
NOT_IN_PYTHON = {
    "prompt_embedding_table": "prompt tables (p-tuning) are not supported by this model: use the tensorrtllm flavour",
    "prompt_vocab_size": "prompt tables (p-tuning) are not supported by this model: use the tensorrtllm flavour",
    "prompt_table_extra_ids": "prompt tables (p-tuning) are not supported by this model: use the tensorrtllm flavour",
    "lora_task_id": "LoRA adapters are not supported by this model: leave lora_* unset",
    "lora_weights": "LoRA adapters are not supported by this model: leave lora_* unset",
    "lora_config": "LoRA adapters are not supported by this model: leave lora_* unset",
    "guided_decoding_guide_type": "guided decoding needs a grammar backend (xgrammar), which this model does not "
                                  "have: leave guided_decoding_* unset",
    "guided_decoding_guide": "guided decoding needs a grammar backend (xgrammar), which this model does not have: "
                             "leave guided_decoding_* unset",
}
# client-contract inputs forwarded to tensorrt_llm as they are (client name -> tensorrt_llm name)
FORWARDED = {"prompt_embedding_table": "prompt_embedding_table", "prompt_vocab_size": "prompt_vocab_size",
             "prompt_table_extra_id": "prompt_table_extra_ids", "lora_task_id": "lora_task_id",
             "lora_weights": "lora_weights", "lora_config": "lora_config",
             "guided_decoding_guide_type": "guided_decoding_guide_type",
             "guided_decoding_guide": "guided_decoding_guide"}
# upstream BLS inputs for models and features the Loop model does not have: refused when set
REFUSED_TEXT_INPUTS = {
    "decoder_text_input": "decoder_text_input is for encoder-decoder models; the Loop model is decoder-only: "
                          "leave it unset",
    "image_input": "the Loop model is text-only: leave image_input unset",
    "image_bytes_input": "the Loop model is text-only: leave image_bytes_input unset",
    "image_url_input": "the Loop model is text-only: leave image_url_input unset",
    "image_sizes_input": "the Loop model is text-only: leave image_sizes_input unset",
    "video_bytes_input": "the Loop model is text-only: leave video_bytes_input unset",
    "num_draft_tokens": "speculative decoding with a draft model is not configured: leave num_draft_tokens unset "
                        "or 0",
    "use_draft_logits": "speculative decoding with a draft model is not configured: leave use_draft_logits unset "
                        "or false",
}


def _is_set(a) -> bool:
    """An optional input counts as set when it holds something other than empties / zeros / false."""
    if a is None or a.size == 0:
        return False
    if a.dtype.kind in "OSU":
        return any(_nbytes(v) for v in a.reshape(-1))
    return bool(np.any(a != 0))
# token counts every flavour can return (upstream: return_num_input_tokens -> num_input_tokens, ...)
COUNT_FLAGS = ("return_num_input_tokens", "return_num_output_tokens")


@dataclass(frozen=True)
class LLMRequest:
    """One prompt for ``tensorrt_llm`` (TensorRT-LLM's tensor contract), validated."""
    input_ids: list[int]
    output_len: int                     # request_output_len, at most max_seq_len - len(input_ids) when known
    end_id: int | None = None           # None: the model's eos ids; < 0: no end token (TRT-LLM)
    pad_id: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stop_words: list[list[int]] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    embedding_bias: bool = False        # a non-empty embedding_bias was sent
    bias: Any = field(default=None, compare=False)  # its values ([V'] float32, V' <= vocab_size), when sent
    returns: tuple[str, ...] = ()       # the RETURN_FLAGS set true
    streaming: bool = False
    exclude_input: bool = False
    asked_len: int = 0                  # request_output_len as sent (> output_len: cut to fit max_seq_len)
    counts: tuple[str, ...] = ()        # the COUNT_FLAGS set true (num_input_tokens / num_output_tokens outputs)
    python_unsupported: tuple[str, ...] = ()  # the NOT_IN_PYTHON inputs that were set

    def features(self) -> dict[str, str]:
        """The optional features this request turns on: input name -> how it was set."""
        out = {o.llm: f"{o.llm}={_show(getattr(self.sampling, o.name))}" for o in SAMPLING
               if o.off is not None and getattr(self.sampling, o.name) not in (None, *o.off)}
        out.update({r: r for r in self.returns})
        if self.bad_words:
            out["bad_words_list"] = "bad_words_list"
        if self.embedding_bias:
            out["embedding_bias"] = "embedding_bias"
        out.update({k: k for k in self.python_unsupported})
        return out

    def reject(self, unsupported, who: str) -> None:
        """Refuse a request that turns on one of the ``unsupported`` inputs (or of :data:`NOT_IN_PYTHON`, which
        no Python model implements), naming it."""
        on = self.features()
        for name in self.python_unsupported:
            raise RequestError(f"{name} is set: {NOT_IN_PYTHON[name]} ({who})")
        for name in unsupported:
            if name in on:
                off = next((o.off[0] for o in SAMPLING if o.llm == name and o.off), None)
                fix = "leave it unset" + (f" or send {off}" if off is not None else "")
                raise RequestError(f"{on[name]} is not supported by {who}: {fix}")


def is_stop(inp: Inputs) -> bool:
    """TensorRT-LLM's cancel request: ``stop=true`` with the request id of the request to end."""
    return bool(scalar(inp, "stop", bool, False))


def parse_llm_requests(inp: Inputs, *, default_exclude: bool = False, vocab_size: int | None = None,
                       max_seq_len: int | None = None) -> list[LLMRequest]:
    """One :class:`LLMRequest` per prompt of a ``tensorrt_llm`` request: ``input_ids`` ``[batch, N]`` (or ``[N]``
    for one prompt), every other input one row / value per prompt. Served by the rule of :class:`BatchResponder`
    (TensorRT-LLM's C++ backend makes one executor request per row: ``triton_backend/inflight_batcher_llm/src/
    model_instance_state.cc``, "A single TRITONBACKEND_Request will produce multiple executor requests")."""
    ids = tensor(inp, "input_ids", int)
    if ids is None:
        raise RequestError("input_ids is missing: send the prompt token ids (INT32 [1, N])")
    if ids.ndim not in (1, 2):
        raise RequestError(f"input_ids must have shape [1, N], got {list(ids.shape)}")
    id_rows = [ids] if ids.ndim == 1 else list(ids)
    batch = len(id_rows)
    if batch == 0:
        raise RequestError("input_ids is empty: send at least one token")
    lengths = scalars(inp, "input_lengths", int, batch)
    out_lens = scalars(inp, "request_output_len", int, batch)
    end_ids, pad_ids = scalars(inp, "end_id", int, batch), scalars(inp, "pad_id", int, batch)
    stops, bads = rows(inp, "stop_words_list", int, batch, 2), rows(inp, "bad_words_list", int, batch, 2)
    biases = rows(inp, "embedding_bias", float, batch)
    flags = {r: scalars(inp, r, bool, batch) for r in (*RETURN_FLAGS, *COUNT_FLAGS, "streaming",
                                                       "exclude_input_in_output")}
    sampling = Sampling.parse(inp, batch)
    unsupported = tuple(n for n in NOT_IN_PYTHON if _is_set(inp.get(n)))
    out = []
    for b in range(batch):
        row = [int(t) for t in id_rows[b].reshape(-1)]
        if not row:
            raise RequestError("input_ids is empty: send at least one token")
        n = len(row) if lengths[b] is None else lengths[b]
        if not 0 < n <= len(row):
            raise RequestError(f"input_lengths={n} but input_ids has {len(row)} ids: send 1..{len(row)}")
        row = row[:n]
        bad = next((t for t in row if t < 0 or (vocab_size and t >= vocab_size)), None)
        if bad is not None:
            allowed = f"[0, {vocab_size})" if vocab_size else "[0, vocab_size)"
            raise RequestError(f"input_ids contains {bad}, outside the vocabulary {allowed}")
        if max_seq_len and n >= max_seq_len:
            raise RequestError(f"the prompt is {n} tokens long; this model serves at most {max_seq_len - 1} "
                               "prompt tokens (max_seq_len - 1): shorten the prompt")
        out_len = out_lens[b]
        if out_len is None or out_len < 1:
            raise RequestError(f"request_output_len must be >= 1, got {out_len}: ask for at least one token")
        asked = out_len
        if max_seq_len:  # TRT-LLM clamps the new tokens to the sequence length likewise (and warns: the models log it)
            out_len = min(out_len, max_seq_len - n)
        excl = flags["exclude_input_in_output"][b]
        bias = None if biases[b] is None or np.asarray(biases[b]).size == 0 else \
            np.asarray(biases[b], dtype=np.float32).reshape(-1)
        if bias is not None and not np.isfinite(bias).all():
            raise RequestError(f"embedding_bias must be finite numbers, got {_show(float(bias[~np.isfinite(bias)][0]))}")
        if bias is not None and vocab_size and bias.size > vocab_size:
            raise RequestError(f"embedding_bias has {bias.size} values but the vocabulary has {vocab_size}: send at "
                               "most one value per token id")
        out.append(LLMRequest(
            input_ids=row, output_len=out_len, end_id=end_ids[b], pad_id=pad_ids[b], sampling=sampling[b],
            stop_words=from_word_list(stops[b], "stop_words_list"),
            bad_words=from_word_list(bads[b], "bad_words_list"),
            embedding_bias=bias is not None, bias=bias,
            returns=tuple(r for r in RETURN_FLAGS if flags[r][b]),
            streaming=bool(flags["streaming"][b]),
            exclude_input=default_exclude if excl is None else excl, asked_len=asked,
            counts=tuple(c for c in COUNT_FLAGS if flags[c][b]), python_unsupported=unsupported))
    return out


def parse_llm_request(inp: Inputs, *, who: str = "tensorrt_llm", **kw) -> LLMRequest:
    """The one prompt of a ``tensorrt_llm`` request, for a model that serves one prompt per request (``who``)."""
    ids = tensor(inp, "input_ids", int)
    if ids is not None and ids.ndim == 2 and ids.shape[0] != 1:
        raise RequestError(f"batch of {ids.shape[0]} prompts in one request: {who} takes one prompt per "
                           "request; send concurrent requests instead")
    return parse_llm_requests(inp, **kw)[0]


# ----------------------------------------------------------------------------- batches (one rule)
class BatchResponder:
    """The one batch rule of every model that serves several prompts in one request (``tensorrt_llm`` reference and
    llmapi, ``tensorrt_llm_bls``), upstream's. Decoupled: each prompt is served as its own request and answers with
    its own responses, each tagged with the prompt's row in ``batch_index`` (``[1, 1]``); a prompt's last response
    (or its error) ends only that prompt, and the request's final flag rides on the response that ends the last
    prompt (``model_instance_state.cc``: ``pendingBatchedRequestIds``, ``signalFinal``; the BLS reads
    ``batch_index`` like ``tensorrt_llm_bls/1/lib/decode.py`` ``postprocess``). Not decoupled (``merge``): a
    request has one response, so each prompt's last outputs are kept and, once every prompt has ended, sent as one
    response whose outputs are the prompts' rows stacked along the batch axis (padded: :func:`stack_rows`); an
    error of any prompt is the request's one response. Nothing is merged across prompts or dropped: a batch of B
    prompts gives B results. Outputs are given as ``parts`` (``[(name, array), ...]``) and turned into a response
    by ``build``; a ready response (an error) is passed as ``response``. Thread-safe (the BLS finishes prompts on
    several threads)."""

    def __init__(self, sender, batch: int, final_flag: int, build: Callable | None = None, merge: bool = False):
        import threading

        self.sender, self.left, self.final_flag = sender, batch, final_flag
        self.build, self.merge, self.done = build, merge and batch > 1, False
        self.rows: dict[int, list] = {}
        self.lock = threading.Lock()

    def send(self, response=None, last: bool = False, parts=None, index: int = 0) -> None:
        """Send one prompt's (row ``index``) ``parts`` or ready ``response``; ``last``: it ends that prompt (the final
        flag when it is the last)."""
        with self.lock:
            if self.done:
                return
            if self.merge:
                if parts is None and response is not None:  # an error: the request's one response
                    self.done = True
                    self.sender.send(response, flags=self.final_flag)
                    return
                if not last:
                    return  # a non-decoupled model has no partial responses
                self.rows[index] = list(parts or [])
                self.left -= 1
                if self.left == 0:
                    self.done = True
                    self.sender.send(self.build(stack_rows([self.rows[b] for b in sorted(self.rows)])),
                                     flags=self.final_flag)
                return
            flags = 0
            if last:
                self.left -= 1
                flags = self.final_flag if self.left == 0 else 0
                self.done = self.left == 0
            if parts is not None:
                response = self.build(parts)
            if response is None and not flags:
                return  # an empty non-final response says nothing
            if response is None:
                self.sender.send(flags=flags)
            else:
                self.sender.send(response, flags=flags)


def stack_rows(rows: list[list]) -> list:
    """Several prompts' outputs (each ``[(name, array with batch axis 1), ...]``) as one batch: arrays of the same
    name padded on every other axis to the largest (0, or ``b""`` for strings) and stacked along axis 0;
    ``batch_index`` becomes each row's index. The prompts' ``sequence_length`` says how much of a padded row is
    theirs."""
    names = [n for n, _ in rows[0]]
    out = []
    for name in names:
        arrs = []
        for b, row in enumerate(rows):
            a = dict(row).get(name)
            if a is None:
                raise RequestError(f"prompt {b} of the batch has no {name} output: the prompts asked for different "
                                   "outputs; send them as separate requests")
            arrs.append(np.asarray(a) if name != "batch_index" else np.array([[b]], dtype=np.int32))
        ndim = max(a.ndim for a in arrs)
        arrs = [a.reshape(a.shape + (1,) * (ndim - a.ndim)) if a.ndim < ndim else a for a in arrs]
        shape = [max(a.shape[k] for a in arrs) for k in range(1, ndim)]
        padded = []
        for a in arrs:
            fill = b"" if a.dtype == object else 0
            p = np.full((a.shape[0], *shape), fill, dtype=a.dtype)
            p[(slice(None), *(slice(0, n) for n in a.shape[1:]))] = a
            padded.append(p)
        out.append((name, np.concatenate(padded, axis=0)))
    return out


# ----------------------------------------------------------------------------- client (text) requests
# the ensemble's names for the client inputs the preprocessing model receives (triton_repo/common/ensemble)
PREPROCESSING_NAMES = {"text_input": "QUERY", "max_tokens": "REQUEST_OUTPUT_LEN",
                       "apply_chat_template": "APPLY_CHAT_TEMPLATE", "chat_messages": "CHAT_MESSAGES",
                       "system_prompt": "SYSTEM_PROMPT", "stop_words": "STOP_WORDS_DICT",
                       "bad_words": "BAD_WORDS_DICT", "end_id": "END_ID", "pad_id": "PAD_ID",
                       "decoder_text_input": "DECODER_QUERY", "embedding_bias_words": "EMBEDDING_BIAS_WORDS",
                       "embedding_bias_weights": "EMBEDDING_BIAS_WEIGHTS",
                       "prompt_table_extra_id": "PROMPT_TABLE_EXTRA_ID"}


@dataclass(frozen=True)
class TextRequest:
    """One prompt of the client contract (``ensemble`` / ``tensorrt_llm_bls``), validated."""
    text: str
    max_tokens: int
    chat: list[dict] | None = None      # the messages to apply the chat template to; None: ``text`` verbatim
    stop_words: list[str] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)
    end_id: int | None = None
    pad_id: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    return_log_probs: bool | None = None
    stream: bool = False
    exclude_input: bool = False
    counts: tuple[str, ...] = ()        # the COUNT_FLAGS set true
    returns: tuple[str, ...] = ()       # the RETURN_FLAGS set true (return_log_probs included)
    embedding_bias: tuple = ()          # ((word, weight), ...)
    forwarded: dict = field(default_factory=dict)  # tensorrt_llm name -> array, the FORWARDED inputs that were set


def check_max_tokens(max_tokens: int | None, max_output_len: int = 0) -> int:
    if max_tokens is None:
        raise RequestError("max_tokens is missing: send the maximum number of tokens to generate (>= 1)")
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be >= 1, got {max_tokens}: ask for at least one token")
    if max_output_len and max_tokens > max_output_len:
        raise RequestError(f"max_tokens={max_tokens} exceeds this server's maximum of {max_output_len} "
                           "(max_output_len): ask for fewer tokens")
    return max_tokens


def chat_messages(text: str, apply_chat_template: bool, messages_json: str | None,
                  system_prompt: str | None) -> list[dict] | None:
    """The chat to render: ``chat_messages`` (a JSON list of ``{"role", "content"}``) and/or ``text`` as the
    last user turn, ``system_prompt`` first; None when the request is a plain prompt."""
    messages: list[dict] = []
    if messages_json:
        try:
            messages = json.loads(messages_json)
        except json.JSONDecodeError as e:
            raise RequestError(f"chat_messages is not valid JSON ({e.msg} at char {e.pos}): send a JSON list "
                               'like [{"role": "user", "content": "hi"}]') from None
        except RecursionError:
            raise RequestError('chat_messages is nested too deeply: send a flat JSON list of {"role": str, '
                               '"content": str} objects') from None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise RequestError('chat_messages must be a JSON list of {"role": str, "content": str} objects')
        apply_chat_template = True
    if not apply_chat_template:
        if not text:
            raise RequestError("text_input is empty: send a non-empty prompt (or chat_messages)")
        return None
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    if text:
        messages.append({"role": "user", "content": text})
    if not messages or all(m["role"] == "system" for m in messages):
        raise RequestError("the chat is empty: send text_input (the user message) or chat_messages")
    return messages


def _nbytes(v) -> int:
    if isinstance(v, np.ndarray):
        v = v.item()
    return len(v.encode("utf-8")) if isinstance(v, str) else len(bytes(v))


def check_prompt_bytes(inp: Inputs, batch: int, max_prompt_bytes: int) -> None:
    """Refuse a prompt over ``max_prompt_bytes`` (text_input + chat_messages + system_prompt, per prompt) before
    anything decodes or tokenizes it: a huge prompt is cheap to refuse and costly to tokenize."""
    if not max_prompt_bytes:
        return
    total = [0] * batch
    for name in ("text_input", "chat_messages", "system_prompt"):
        a = inp.get(name)
        if a is None or a.dtype.kind not in "OSU" or a.size != batch:
            continue  # the type/shape checks that follow name the problem
        for b, v in enumerate(a.reshape(-1)):
            total[b] += _nbytes(v)
    worst = max(total, default=0)
    if worst > max_prompt_bytes:
        raise RequestError(f"the prompt is {worst} bytes (text_input + chat_messages + system_prompt); this server "
                           f"accepts at most {max_prompt_bytes} bytes (max_prompt_bytes): shorten it")


def check_context(prompt_tokens: int, max_tokens: int, max_seq_len: int) -> None:
    """The prompt and the tokens asked for must fit the context: refused (not silently cut) when they do not."""
    if max_seq_len and prompt_tokens + max_tokens > max_seq_len:
        room = max_seq_len - prompt_tokens
        raise RequestError(f"the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}: together over this "
                           f"model's context of {max_seq_len} tokens (max_seq_len); ask for at most {room} tokens "
                           "or shorten the prompt")


def parse_text_requests(inp: Inputs, *, max_output_len: int = 0, default_exclude: bool = False,
                        single: bool = False, max_prompt_bytes: int = 0) -> list[TextRequest]:
    """One :class:`TextRequest` per prompt of the batch (``single``: exactly one prompt)."""
    q = tensor(inp, "text_input", str)
    if q is None:
        raise RequestError("text_input is missing: send the prompt as a string")
    batch = q.shape[0] if q.ndim else 1
    if single and q.size != 1:
        raise RequestError("send exactly one text_input per request (batch 1); use concurrent requests")
    if q.size != batch:
        raise RequestError(f"text_input must hold one string per prompt (shape [{batch}, 1]), "
                           f"got shape {list(q.shape)}")
    check_prompt_bytes(inp, batch, max_prompt_bytes)
    texts = [decode_utf8(v, "text_input") for v in q.reshape(-1)]
    get = {name: scalars(inp, name, kind, batch) for name, kind in (
        ("max_tokens", int), ("apply_chat_template", bool), ("chat_messages", str), ("system_prompt", str),
        ("end_id", int), ("pad_id", int), ("return_log_probs", bool), ("stream", bool),
        ("exclude_input_in_output", bool), *((c, bool) for c in COUNT_FLAGS))}
    for name, why in REFUSED_TEXT_INPUTS.items():
        if _is_set(inp.get(name)):
            raise RequestError(why)
    stops, bads = rows(inp, "stop_words", str, batch), rows(inp, "bad_words", str, batch)
    bias_words = rows(inp, "embedding_bias_words", str, batch)
    bias_weights = rows(inp, "embedding_bias_weights", float, batch)
    flags = {r: scalars(inp, r, bool, batch) for r in RETURN_FLAGS}
    forwarded = {}
    for name, llm_name in FORWARDED.items():
        a = inp.get(name)
        if _is_set(a):
            if batch != 1:
                raise RequestError(f"{name} with a batch of {batch} prompts: send one prompt per request")
            forwarded[llm_name] = a
    sampling = Sampling.parse(inp, batch, llm=False)
    out = []
    for b in range(batch):
        v = {k: vals[b] for k, vals in get.items()}
        words = string_list(bias_words[b], "embedding_bias_words")
        weights = [] if bias_weights[b] is None else [float(x) for x in np.asarray(bias_weights[b]).reshape(-1)]
        if len(words) != len(weights):
            raise RequestError(f"embedding_bias_words has {len(words)} words but embedding_bias_weights has "
                               f"{len(weights)} weights: send one weight per word")
        bad = next((w for w in weights if not math.isfinite(w)), None)
        if bad is not None:
            raise RequestError(f"embedding_bias_weights must be finite numbers, got {_show(bad)}")
        out.append(TextRequest(
            returns=tuple(r for r in RETURN_FLAGS if flags[r][b]), embedding_bias=tuple(zip(words, weights)),
            forwarded=forwarded,
            text=texts[b], max_tokens=check_max_tokens(v["max_tokens"], max_output_len),
            chat=chat_messages(texts[b], bool(v["apply_chat_template"]), v["chat_messages"], v["system_prompt"]),
            stop_words=string_list(stops[b], "stop_words"), bad_words=string_list(bads[b], "bad_words"),
            end_id=v["end_id"], pad_id=v["pad_id"], sampling=sampling[b], return_log_probs=v["return_log_probs"],
            stream=bool(v["stream"]), counts=tuple(c for c in COUNT_FLAGS if v[c]),
            exclude_input=default_exclude if v["exclude_input_in_output"] is None else v["exclude_input_in_output"]))
    return out


def parse_text_request(inp: Inputs, **kw) -> TextRequest:
    """The one prompt of a ``tensorrt_llm_bls`` request."""
    return parse_text_requests(inp, single=True, **kw)[0]


# ----------------------------------------------------------------------------- upstream's LLM-API requests
# The request contract of upstream's LLM-API `tensorrt_llm` (triton_backend/all_models/llmapi/tensorrt_llm/
# config.pbtxt, 1/helpers.py: get_sampling_params_from_request, get_output_config_from_request), which the llmapi
# flavour's `tensorrt_llm` accepts beside the tensor contract: the client-contract field -> its tensor there.
LLMAPI_NAMES = {"max_tokens": "sampling_param_max_tokens", "stop_words": "sampling_param_stop",
                "stream": "streaming", "exclude_input_in_output": "sampling_param_exclude_input_from_output",
                "return_perf_metrics": "sampling_param_return_perf_metrics",
                **{k: f"sampling_param_{k}" for k in ("temperature", "top_k", "top_p", "seed", "frequency_penalty",
                                                      "presence_penalty")}}
# upstream's output switches (return_finish_reason -> finish_reason, ...)
LLMAPI_OUTPUTS = {"return_finish_reason": "finish_reason", "return_stop_reason": "stop_reason",
                  "return_cumulative_logprob": "cumulative_logprob"}
_LLMAPI_WORD = re.compile(r"\b(" + "|".join(LLMAPI_NAMES) + r")\b")


@dataclass(frozen=True)
class LLMApiRequest:
    """One prompt of upstream's LLM-API contract: the client request it is (``text``: prompt, max_tokens, stop
    strings, sampling, stream, exclude_input) and the extra outputs it asked for (:data:`LLMAPI_OUTPUTS` keys)."""
    text: TextRequest
    outputs: tuple[str, ...] = ()


def is_llmapi_request(inp: Inputs) -> bool:
    """A request of upstream's LLM-API contract (``text_input``) rather than the tensor contract (``input_ids``);
    both at once is refused."""
    text, ids = inp.get("text_input") is not None, inp.get("input_ids") is not None
    if text and ids:
        raise RequestError("text_input and input_ids are both set: send text_input (the LLM-API contract, "
                           "sampling_param_*) or input_ids (the tensor contract), not both")
    return text


def parse_llmapi_requests(inp: Inputs, **kw) -> list[LLMApiRequest]:
    """One :class:`LLMApiRequest` per prompt (``text_input`` ``[batch, 1]``), by the client contract's rules
    (:func:`parse_text_requests`) under upstream's names (:data:`LLMAPI_NAMES`); errors name upstream's tensors.
    ``sampling_param_best_of`` > 1 (several sequences) and the tensor contract's LoRA / prompt-table / guided inputs
    are refused, never ignored."""
    view = Inputs(inp.get, LLMAPI_NAMES)
    try:
        best = scalars(view, "sampling_param_best_of", int, max(1, _batch(inp)))
        bad = next((v for v in best if v is not None and v != 1), None)
        if bad is not None:
            raise RequestError(f"sampling_param_best_of={bad} is not supported: this model returns one sequence "
                               "per prompt; send 1 or leave it unset")
        for name, why in NOT_IN_PYTHON.items():
            if _is_set(inp.get(name)):
                raise RequestError(f"{name} is set: {why}")
        reqs = parse_text_requests(view, **kw)
        flags = {k: scalars(view, k, bool, len(reqs)) for k in LLMAPI_OUTPUTS}
    except RequestError as e:
        raise RequestError(_LLMAPI_WORD.sub(lambda m: LLMAPI_NAMES[m.group(1)], str(e))) from None
    return [LLMApiRequest(r, tuple(k for k in LLMAPI_OUTPUTS if flags[k][b])) for b, r in enumerate(reqs)]


def _batch(inp: Inputs) -> int:
    q = inp.get("text_input")
    return 1 if q is None or q.ndim == 0 else q.shape[0]
