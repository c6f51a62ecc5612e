"""Clients for the rendered repositories: tritonclient gRPC (bidirectional streaming) and the HTTP
``generate`` / ``generate_stream`` extension. Both send the same fields (``text_input``, ``max_tokens``,
``stream``, ``stop_words``, sampling, chat) to ``ensemble`` or ``tensorrt_llm_bls`` and return/stream text."""
from __future__ import annotations

import http.client
import json
import queue
import uuid
from typing import Callable, Iterator

import numpy as np

# field -> (Triton dtype, numpy dtype, is a list)
FIELDS = {
    "text_input": ("BYTES", object, False), "max_tokens": ("INT32", np.int32, False),
    "apply_chat_template": ("BOOL", np.bool_, False), "chat_messages": ("BYTES", object, False),
    "system_prompt": ("BYTES", object, False), "stop_words": ("BYTES", object, True),
    "bad_words": ("BYTES", object, True), "end_id": ("INT32", np.int32, False), "pad_id": ("INT32", np.int32, False),
    "top_k": ("INT32", np.int32, False), "top_p": ("FP32", np.float32, False),
    "temperature": ("FP32", np.float32, False), "length_penalty": ("FP32", np.float32, False),
    "repetition_penalty": ("FP32", np.float32, False), "min_tokens": ("INT32", np.int32, False),
    "presence_penalty": ("FP32", np.float32, False), "frequency_penalty": ("FP32", np.float32, False),
    "seed": ("UINT64", np.uint64, False), "beam_width": ("INT32", np.int32, False),
    "num_return_sequences": ("INT32", np.int32, False), "return_log_probs": ("BOOL", np.bool_, False),
    "exclude_input_in_output": ("BOOL", np.bool_, False), "stream": ("BOOL", np.bool_, False),
    "return_num_input_tokens": ("BOOL", np.bool_, False), "return_num_output_tokens": ("BOOL", np.bool_, False),
}


class TritonRequestError(RuntimeError):
    """The server answered with an error (the message is the server's)."""


def request_fields(prompt: str = "", max_tokens: int = 64, *, messages: list[dict] | None = None,
                   system_prompt: str | None = None, chat: bool = False, stop_words: list[str] | None = None,
                   temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, exclude_input_in_output: bool = True, **extra) -> dict:
    """The JSON-able request body shared by both protocols (``stream`` is set by the caller)."""
    f: dict = {"text_input": prompt, "max_tokens": max_tokens, "exclude_input_in_output": exclude_input_in_output}
    if messages is not None:
        f["chat_messages"] = json.dumps(messages, ensure_ascii=False)
    if chat or messages is not None:
        f["apply_chat_template"] = True
    if system_prompt:
        f["system_prompt"] = system_prompt
    if stop_words:
        f["stop_words"] = list(stop_words)
    for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seed", seed)):
        if v is not None:
            f[k] = v
    f.update({k: v for k, v in extra.items() if v is not None})
    return f


def check_fields(fields: dict) -> dict:
    """Client-side type check naming the field (the server's own JSON parser does not name it)."""
    for name, value in fields.items():
        if name not in FIELDS:
            raise ValueError(f"unknown request field {name!r}; known: {', '.join(FIELDS)}")
        tdt, _, is_list = FIELDS[name]
        vals = value if is_list else [value]
        if is_list and not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list of strings, got {value!r}")
        for v in vals:
            ok = {"BYTES": isinstance(v, str), "BOOL": isinstance(v, bool),
                  "FP32": isinstance(v, (int, float)) and not isinstance(v, bool)}.get(
                tdt, isinstance(v, int) and not isinstance(v, bool))
            if not ok:
                kind = {"BYTES": "a string", "BOOL": "true/false", "FP32": "a number"}.get(tdt, "an integer")
                raise ValueError(f"{name} must be {kind}, got {v!r}")
    return fields


# ----------------------------------------------------------------------------- gRPC
def grpc_inputs(fields: dict):
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in check_fields(fields).items():
        tdt, ndt, is_list = FIELDS[name]
        vals = list(value) if is_list else [value]
        if ndt is object:
            arr = np.array([[v.encode("utf-8") if isinstance(v, str) else v for v in vals]], dtype=object)
        else:
            arr = np.array([vals], dtype=ndt)
        t = grpcclient.InferInput(name, list(arr.shape), tdt)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def grpc_stream(url: str, model: str, fields: dict, *, stream: bool = True, timeout: float = 120.0,
                request_id: str | None = None, client=None) -> Iterator[str]:
    """Yield text pieces as responses arrive over one gRPC bidirectional stream (``stream=False`` yields one
    piece: the whole text). Raises :class:`TritonRequestError` with the server's message."""
    import tritonclient.grpc as grpcclient

    q: queue.Queue = queue.Queue()
    own = client is None
    c = client or grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    finished = False
    try:
        inputs = grpc_inputs({**fields, "stream": stream})
        try:
            c.async_stream_infer(model, inputs, request_id=request_id or uuid.uuid4().hex,
                                 enable_empty_final_response=True)
        except Exception as e:  # the stream died before sending: the reason went to the callback
            try:
                _, err = q.get(timeout=2)
            except queue.Empty:
                err = None
            msg = err.message() if hasattr(err, "message") else str(err or e)
            raise ConnectionError(msg) from None
        while True:
            try:
                result, error = q.get(timeout=timeout)
            except queue.Empty:
                raise TritonRequestError(f"no response from {model} within {timeout:.0f} s") from None
            if error is not None:
                raise TritonRequestError(str(error.message() if hasattr(error, "message") else error))
            resp = result.get_response()
            out = result.as_numpy("text_output")
            if out is not None:
                for v in np.asarray(out).reshape(-1):
                    s = v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
                    if s:
                        yield s
            final = resp.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                finished = True
                return
    finally:
        c.stop_stream(cancel_requests=not finished)
        if own:
            c.close()


def grpc_generate(url: str, model: str, fields: dict, *, stream: bool = True,
                  on_text: Callable[[str], None] | None = None, timeout: float = 120.0) -> str:
    parts = []
    for s in grpc_stream(url, model, fields, stream=stream, timeout=timeout):
        parts.append(s)
        if on_text:
            on_text(s)
    return "".join(parts)


# ----------------------------------------------------------------------------- HTTP generate extension
def _http_post(url: str, path: str, body: dict, timeout: float):
    host, _, port = url.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request("POST", path, body=json.dumps(body).encode("utf-8"), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def http_stream(url: str, model: str, fields: dict, *, stream: bool = True, timeout: float = 120.0,
                validate: bool = True) -> Iterator[str]:
    """``/generate_stream`` (SSE; an error can arrive inside the stream after HTTP 200) or ``/generate``.
    ``validate=False`` sends the fields unchecked (to see the server's own answer)."""
    if validate:
        check_fields(fields)
    path = f"/v2/models/{model}/generate" + ("_stream" if stream else "")
    conn, r = _http_post(url, path, {**fields, "stream": stream}, timeout)
    try:
        if r.status != 200:
            raw = r.read().decode("utf-8", errors="replace").strip()
            body = raw[5:].strip() if raw.startswith("data:") else raw  # generate_stream errors come as SSE
            try:
                msg = json.loads(body).get("error", raw)
            except (json.JSONDecodeError, AttributeError):
                msg = raw
            raise TritonRequestError(f"HTTP {r.status}: {msg}")
        if not stream:
            d = json.loads(r.read().decode("utf-8"))
            if "error" in d:
                raise TritonRequestError(d["error"])
            yield _text_of(d)
            return
        buf = b""
        while True:
            line = r.readline()
            if not line:
                break
            buf += line
            if line.strip():
                continue
            event, buf = buf.decode("utf-8"), b""
            for ln in event.splitlines():
                if ln.startswith("data:"):
                    d = json.loads(ln[5:].strip())
                    if "error" in d:
                        raise TritonRequestError(d["error"])
                    s = _text_of(d)
                    if s:
                        yield s
    finally:
        conn.close()


def _text_of(d: dict) -> str:
    v = d.get("text_output", "")
    return "".join(v) if isinstance(v, list) else str(v)


def http_generate(url: str, model: str, fields: dict, *, stream: bool = False,
                  on_text: Callable[[str], None] | None = None, timeout: float = 120.0, validate: bool = True) -> str:
    parts = []
    for s in http_stream(url, model, fields, stream=stream, timeout=timeout, validate=validate):
        parts.append(s)
        if on_text:
            on_text(s)
    return "".join(parts)
