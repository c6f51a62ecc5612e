"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of a Triton repository's client contract.

``trtllm-loop serve REPO --openai-port N`` starts it beside the Triton server, on 127.0.0.1 unless told
otherwise. It speaks only the client contract of ``triton_repo/README.md`` over Triton gRPC (bidirectional
streaming), so it serves the ``reference``, ``llmapi`` and ``tensorrtllm`` flavours alike:

* ``GET /v1/models`` -- ``tensorrt_llm_bls`` (exact streaming; the default) and ``ensemble``;
* ``POST /v1/completions`` -- ``prompt`` (one string) as ``text_input``;
* ``POST /v1/chat/completions`` -- ``messages`` as ``chat_messages``: the checkpoint's chat template is applied by
  the Triton models (``apply_chat_template``);
* ``stream`` (server-sent events, ``data: [DONE]`` at the end), ``stop``, ``max_tokens`` /
  ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``presence_penalty``, ``frequency_penalty``;
  ``usage`` from the models' ``num_input_tokens`` / ``num_output_tokens``; ``finish_reason`` ``length`` when
  ``max_tokens`` tokens were generated, else ``stop``;
* errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a request the models
  refuse (their one-line message), 404 for an unknown model, 500/502 for a server-side failure; an error inside a
  stream arrives as an ``error`` event;
* a client that disconnects cancels its Triton request (the gRPC stream is cancelled; ``tensorrt_llm_bls`` then
  stops generation).

Not supported (refused with 400, naming the field): ``n`` > 1, ``echo``, ``logprobs``, ``tools`` /
``tool_choice`` / ``response_format`` (no grammar backend), ``suffix``, ``best_of`` > 1, non-text message parts.
"""
import asyncio
import json
import math
import time
import uuid

from trtllm_loop.serving.textproc import drop_stop_suffix

HOST = "127.0.0.1"
MODELS = ("tensorrt_llm_bls", "ensemble")
UNSUPPORTED = ("echo", "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
               "response_format", "suffix", "logit_bias")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _triton_error(msg: str) -> APIError:
    """A Triton error message -> the OpenAI status: the models' refusals are the client's (400)."""
    if "unknown model" in msg or "is not found" in msg:
        return APIError(404, msg, "model", code="model_not_found")
    if "internal error" in msg or "did not answer" in msg:
        return APIError(500, msg, type_="server_error")
    return APIError(400, msg)


# ----------------------------------------------------------------------------- request translation
def _number(body: dict, name: str, integer: bool = False):
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise APIError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if not integer and not math.isfinite(v):  # NaN / Infinity parse as JSON extensions: refuse by name
        raise APIError(400, f"{name} must be a finite number, got {v!r}", name)
    return v


def _text_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise APIError(400, f"{where}: only text content parts are supported", "messages")
            parts.append(p["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise APIError(400, f"{where}: content must be a string or a list of text parts", "messages")


def triton_fields(body: dict, chat: bool, default_max_tokens: int) -> dict:
    """An OpenAI request body -> the client-contract fields of ``tensorrt_llm_bls`` / ``ensemble``."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise APIError(400, f"{name} is not supported by this server: leave it unset", name)
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise APIError(400, f"{name}={body.get(name)!r} is not supported: only 1 choice per request", name)
    max_tokens = _number(body, "max_completion_tokens", True) if chat else None
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", True)
    f: dict = {"max_tokens": default_max_tokens if max_tokens is None else max_tokens,
               "exclude_input_in_output": True, "return_num_input_tokens": True, "return_num_output_tokens": True}
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, f"messages[{i}] must be an object with a string role", "messages")
            out.append({"role": m["role"], "content": _text_content(m.get("content"), f"messages[{i}]")})
        f["text_input"] = ""
        f["chat_messages"] = json.dumps(out, ensure_ascii=False)
        f["apply_chat_template"] = True
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be one string (token-id and batched prompts are not supported)",
                           "prompt")
        f["text_input"] = prompt
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise APIError(400, "stop must be a string or a list of strings", "stop")
        if stop:
            f["stop_words"] = stop
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        v = _number(body, name)
        if v is not None:
            f[name] = float(v)
    seed = _number(body, "seed", True)
    if seed is not None:
        if seed < 0:
            raise APIError(400, f"seed must be >= 0, got {seed}", "seed")
        f["seed"] = seed
    return f


# ----------------------------------------------------------------------------- Triton gRPC
async def triton_stream(client, model: str, fields: dict, stream: bool, request_id: str):
    """Yield ``(text, counts, final)`` per Triton response of one request over one gRPC stream."""
    import numpy as np

    from trtllm_loop.serving.client import grpc_inputs

    inputs = grpc_inputs({**fields, "stream": stream})
    done = asyncio.Event()

    async def requests():
        yield {"model_name": model, "inputs": inputs, "request_id": request_id, "enable_empty_final_response": True}
        await done.wait()  # keep the stream open until the final response

    try:
        async for result, error in client.stream_infer(inputs_iterator=requests()):
            if error is not None:
                raise _triton_error(error.message() if hasattr(error, "message") else str(error))
            resp = result.get_response()
            out = result.as_numpy("text_output")
            text = "" if out is None else "".join(
                v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
                for v in np.asarray(out).reshape(-1))
            counts = {}
            for k in ("num_input_tokens", "num_output_tokens"):
                a = result.as_numpy(k)
                if a is not None:
                    counts[k] = int(np.asarray(a).reshape(-1)[0])
            final = resp.parameters.get("triton_final_response")
            final = final is not None and final.bool_param
            yield text, counts, final
            if final:
                return
    finally:
        done.set()


# ----------------------------------------------------------------------------- app
def create_app(grpc_url: str, *, default_max_tokens: int = 16, models=MODELS):
    """The FastAPI application, talking to the Triton gRPC endpoint ``grpc_url``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    import tritonclient.grpc.aio as grpcaio

    import contextlib

    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if "client" in state:
            await state["client"].close()

    app = FastAPI(title="trtllm-loop OpenAI-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan)

    def client():
        if "client" not in state:
            state["client"] = grpcaio.InferenceServerClient(grpc_url)
        return state["client"]

    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        return JSONResponse(status_code=exc.status, content=exc.body())

    @app.exception_handler(Exception)
    async def _other(_req, exc: Exception):  # one line, never a traceback
        return JSONResponse(status_code=500, content=APIError(500, f"internal error ({type(exc).__name__})",
                                                              type_="server_error").body())

    @app.get("/v1/models")
    async def list_models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "trtllm-loop"}
                                           for m in models]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    async def parse(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON ({type(e).__name__})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model") or models[0]
        if model not in models:
            raise APIError(404, f"model {model!r} does not exist; available: {', '.join(models)}", "model",
                           code="model_not_found")
        body["model"] = model
        return body

    def finish_reason(counts: dict, fields: dict) -> str:
        return "length" if counts.get("num_output_tokens", -1) >= fields["max_tokens"] else "stop"

    def usage(counts: dict) -> dict:
        p, c = counts.get("num_input_tokens", 0), counts.get("num_output_tokens", 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def run(request: Request, chat: bool):
        body = await parse(request)
        fields = triton_fields(body, chat, default_max_tokens)
        model, stream = body["model"], bool(body.get("stream"))
        rid = f"oai-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        oid = ("chatcmpl-" if chat else "cmpl-") + rid[4:]
        obj = "chat.completion" if chat else "text_completion"

        def choice(text, reason, delta=False):
            if not chat:
                return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            msg = {"content": text} if delta else {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): msg, "finish_reason": reason, "logprobs": None}

        if not stream:
            async def collect():
                parts, counts = [], {}
                async for text, c, _ in triton_stream(client(), model, fields, False, rid):
                    parts.append(text)
                    counts.update(c)
                return "".join(parts), counts

            task = asyncio.ensure_future(collect())
            while not task.done():  # cancel the Triton request when the client goes away
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    return JSONResponse(status_code=499, content=APIError(499, "client disconnected").body())
            text, counts = task.result()
            # Triton returns the stop word (triton_repo/README.md, "Stop words"); OpenAI's text does not contain it
            text = drop_stop_suffix(text, fields.get("stop_words") or [])
            return {"id": oid, "object": obj, "created": created, "model": model,
                    "choices": [choice(text, finish_reason(counts, fields))], "usage": usage(counts)}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def sse(d: dict) -> str:
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        def chunk(text, reason=None, first=False):
            c = choice(text, reason, delta=True)
            if chat and first:
                c["delta"] = {"role": "assistant", "content": text}
            if chat and reason is not None and not text:
                c["delta"] = {}
            return sse({"id": oid, "object": chunk_obj, "created": created, "model": model, "choices": [c]})

        async def events():
            counts = {}
            if chat:
                yield chunk("", first=True)
            stops = fields.get("stop_words") or []
            hold = max((len(w) for w in stops), default=0)  # a tail that may be the returned stop word
            held = ""
            try:
                async for text, c, _ in triton_stream(client(), model, fields, True, rid):
                    counts.update(c)
                    held += text
                    out, held = (held[:len(held) - hold], held[len(held) - hold:]) if hold else (held, "")
                    if out:
                        yield chunk(out)
                held = drop_stop_suffix(held, stops)
                if held:
                    yield chunk(held)
            except APIError as e:
                yield sse(e.body())
                yield "data: [DONE]\n\n"
                return
            yield chunk("", finish_reason(counts, fields))
            if include_usage:
                yield sse({"id": oid, "object": chunk_obj, "created": created, "model": model, "choices": [],
                           "usage": usage(counts)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    return app


class OpenAIServer:
    """uvicorn on a background thread: ``OpenAIServer(grpc_url, port).start()`` ... ``.stop()``."""

    def __init__(self, grpc_url: str, port: int, host: str = HOST, default_max_tokens: int = 16, log_level="warning"):
        self.grpc_url, self.port, self.host = grpc_url, port, host
        self.default_max_tokens, self.log_level = default_max_tokens, log_level
        self.thread = None
        self.server = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> "OpenAIServer":
        import threading

        import uvicorn

        from trtllm_loop.errors import UserError
        from trtllm_loop.serving.server import check_port_free

        if self.host in ("127.0.0.1", "localhost"):
            check_port_free(self.port, "OpenAI")
        config = uvicorn.Config(create_app(self.grpc_url, default_max_tokens=self.default_max_tokens),
                                host=self.host, port=self.port, log_level=self.log_level, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="openai-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.started:
                return self
            if not self.thread.is_alive():
                break
            time.sleep(0.05)
        raise UserError(f"the OpenAI-compatible server did not start on {self.host}:{self.port}")

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def chat_stream(base_url: str, messages: list[dict], max_tokens: int, model: str = MODELS[0], timeout: float = 120):
    """Stream a chat reply from an OpenAI-compatible ``base_url`` (``http://host:port/v1``) with the standard
    library only: yields the content deltas; raises :class:`APIError` with the server's message."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True}
    conn.request("POST", u.path.rstrip("/") + "/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    try:
        if r.status != 200:
            raise APIError(r.status, json.loads(r.read() or b"{}").get("error", {}).get("message", f"HTTP {r.status}"))
        while True:
            line = r.readline()
            if not line:
                return
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            d = json.loads(data)
            if "error" in d:
                raise APIError(500, d["error"].get("message", "error"))
            for c in d.get("choices", []):
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    yield piece
    finally:
        conn.close()
