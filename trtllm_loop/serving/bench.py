"""Serving benchmark: TTFT, TPOT, output tokens/s, requests/s and latency percentiles per concurrency level,
against an OpenAI-compatible endpoint (``serve --openai-port``, ``trtllm-serve``), Triton gRPC streaming or
Triton's HTTP ``generate_stream`` -- the same streaming request each time, timed on the client.

Per request: TTFT = first streamed text - send; TPOT = (end - first text) / (output tokens - 1) (vLLM's
``benchmark_serving`` definition: text pieces can hold several tokens), with the
token count from the server (``usage`` / ``num_output_tokens``) where it gives one, else the number of streamed
pieces; end-to-end latency. Per level: output tokens/s and requests/s over the level's wall time, p50/p90/p99,
errors (with the first messages). Every wait has a timeout and every loop a bound (``num_requests`` or
``duration``).
"""
from __future__ import annotations

import http.client
import json
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

ENDPOINTS = ("openai", "triton-grpc", "triton-http")
WORDS = ("def class return import self value list dict for while if else try except with yield lambda "
         "async await print range len str int float None True False data result index count total").split()


@dataclass
class Sample:
    start: float
    end: float
    ok: bool
    ttft: float | None = None
    tpot: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Target:
    kind: str
    url: str
    model: str
    timeout: float = 120.0
    ignore_eos: bool = False

    def __post_init__(self):
        if self.kind not in ENDPOINTS:
            raise ValueError(f"endpoint {self.kind!r} unknown; allowed: {', '.join(ENDPOINTS)}")
        self.address()

    def address(self) -> tuple[str, int]:
        """(host, port) of the URL; ValueError naming what is wrong (every driver connects there)."""
        u = urlparse(self.url if "://" in self.url else f"http://{self.url}")
        try:
            port = u.port
        except ValueError:
            raise ValueError(f"URL {self.url!r}: the port is not a number in 0..65535") from None
        if not u.hostname:
            raise ValueError(f"URL {self.url!r}: no host; e.g. http://127.0.0.1:9000 or 127.0.0.1:8001")
        if port is None and self.kind == "triton-grpc":
            raise ValueError(f"URL {self.url!r}: Triton gRPC needs host:port, e.g. 127.0.0.1:8001")
        return u.hostname, port or 80


def probe(t: Target, timeout: float = 10.0) -> None:
    """A TCP connect to the target within ``timeout`` seconds: an unreachable endpoint fails here, once,
    instead of once per request with the full request timeout. OSError (refused, unknown host, timeout)."""
    import socket

    host, port = t.address()
    socket.create_connection((host, port), timeout=min(timeout, t.timeout)).close()


def synthetic_prompts(n: int, input_len: int, seed: int = 0) -> list[str]:
    """n distinct prompts of ``input_len`` words (about one token each with a code tokenizer)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(max(1, input_len))) for _ in range(n)]


def load_prompts(path: str | Path) -> list[str]:
    """``.jsonl`` (``{"prompt": ...}`` per line), ``.json`` (a list of strings) or text (one prompt per line)."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        data = json.loads(text)
        prompts = data if isinstance(data, list) else None
    elif p.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                r = json.loads(line)
                if not isinstance(r, dict) or "prompt" not in r:
                    raise ValueError(f"{path}:{i}: expected an object with a 'prompt' string")
                prompts.append(r["prompt"])
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts or not all(isinstance(s, str) and s for s in prompts):
        raise ValueError(f"{path}: expected non-empty prompts (.json list of strings, .jsonl with 'prompt', or "
                         "one prompt per line)")
    return prompts


# ----------------------------------------------------------------------------- one streamed request
def _sse_lines(resp, deadline: float):
    while time.perf_counter() < deadline:
        line = resp.readline()
        if not line:
            return
        line = line.strip()
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)
    raise TimeoutError("stream exceeded the request timeout")


def _post(url: str, path: str, body: dict, timeout: float):
    u = urlparse(url if "://" in url else f"http://{url}")
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    conn.request("POST", u.path.rstrip("/") + path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        msg = r.read(2000).decode("utf-8", "replace").strip()
        conn.close()
        raise RuntimeError(f"HTTP {r.status}: {msg[:300]}")
    return conn, r


def _openai(t: Target, prompt: str, max_tokens: int, mark):
    body = {"model": t.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if t.ignore_eos:
        body["ignore_eos"] = True  # trtllm-serve / vLLM extension
    base = t.url.rstrip("/")
    conn, r = _post(base, "/completions" if base.endswith("/v1") else "/v1/completions", body, t.timeout)
    count = None
    try:
        for d in _sse_lines(r, time.perf_counter() + t.timeout):
            if "error" in d:
                raise RuntimeError(str(d["error"].get("message", d["error"]))[:300])
            if any(c.get("text") for c in d.get("choices", [])):
                mark()
            if d.get("usage"):
                count = d["usage"].get("completion_tokens")
    finally:
        conn.close()
    return count


def _triton_fields(t: Target, prompt: str, max_tokens: int) -> dict:
    from trtllm_loop.serving.client import request_fields

    f = request_fields(prompt, max_tokens, temperature=0.0, return_num_output_tokens=True)
    if t.ignore_eos:
        f["end_id"] = -1
    return f


def _triton_http(t: Target, prompt: str, max_tokens: int, mark):
    body = {**_triton_fields(t, prompt, max_tokens), "stream": True}
    conn, r = _post(t.url, f"/v2/models/{t.model}/generate_stream", body, t.timeout)
    count = None
    try:
        for d in _sse_lines(r, time.perf_counter() + t.timeout):
            if "error" in d:
                raise RuntimeError(str(d["error"])[:300])
            out = d.get("text_output", "")
            if (out if isinstance(out, str) else "".join(out)):
                mark()
            n = d.get("num_output_tokens")
            if n is not None:
                count = int(n[0] if isinstance(n, list) else n)
    finally:
        conn.close()
    return count


def _triton_grpc(t: Target, prompt: str, max_tokens: int, mark):
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    from trtllm_loop.serving.client import grpc_inputs

    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(t.url.split("://")[-1])
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    count, done = None, False
    try:
        c.async_stream_infer(t.model, grpc_inputs({**_triton_fields(t, prompt, max_tokens), "stream": True}),
                             request_id=uuid.uuid4().hex, enable_empty_final_response=True)
        deadline = time.perf_counter() + t.timeout
        while not done:
            result, error = q.get(timeout=max(0.01, deadline - time.perf_counter()))
            if error is not None:
                raise RuntimeError(str(error.message() if hasattr(error, "message") else error)[:300])
            out = result.as_numpy("text_output")
            if out is not None and any(np.asarray(out).reshape(-1)):
                mark()
            n = result.as_numpy("num_output_tokens")
            if n is not None:
                count = int(np.asarray(n).reshape(-1)[0])
            done = result.get_response().parameters["triton_final_response"].bool_param
    except queue.Empty:
        raise TimeoutError(f"no response within {t.timeout:.0f} s") from None
    finally:
        c.stop_stream(cancel_requests=not done)
        c.close()
    return count


DRIVERS = {"openai": _openai, "triton-grpc": _triton_grpc, "triton-http": _triton_http}


def one_request(t: Target, prompt: str, max_tokens: int) -> Sample:
    marks: list[float] = []
    start = time.perf_counter()
    try:
        count = DRIVERS[t.kind](t, prompt, max_tokens, lambda: marks.append(time.perf_counter()))
    except Exception as e:  # an error is a measurement: counted and reported per level
        return Sample(start, time.perf_counter(), False, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    tokens = count if count is not None else len(marks)
    if not marks:  # finished without visible text (an immediate end id): no TTFT to report
        return Sample(start, end, True, tokens=tokens)
    tpot = (end - marks[0]) / (tokens - 1) if tokens > 1 else None     # vLLM's benchmark_serving definition
    return Sample(start, end, True, marks[0] - start, tpot, tokens)


# ----------------------------------------------------------------------------- a level, a run
def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    s = sorted(xs)

    def pct(p):  # linear interpolation between closest ranks
        i = (len(s) - 1) * p / 100
        lo = int(i)
        return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (i - lo)

    return {"mean": sum(s) / len(s), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(concurrency: int, samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.ok]
    errors = [s.error for s in samples if not s.ok]
    tokens = sum(s.tokens for s in ok)
    return {"concurrency": concurrency, "requests": len(samples), "completed": len(ok), "errors": len(errors),
            "error_messages": sorted(set(errors))[:5], "wall_s": wall, "output_tokens": tokens,
            "output_tok_s": tokens / wall if wall > 0 else 0.0, "req_s": len(ok) / wall if wall > 0 else 0.0,
            "ttft_s": percentiles([s.ttft for s in ok if s.ttft is not None]),
            "tpot_s": percentiles([s.tpot for s in ok if s.tpot is not None]),
            "latency_s": percentiles([s.end - s.start for s in ok]),
            "samples": [asdict(s) for s in samples]}


def run_level(t: Target, prompts: list[str], max_tokens: int, concurrency: int, num_requests: int,
              duration: float | None = None, progress=None) -> dict:
    """``concurrency`` workers send requests back to back until ``num_requests`` were sent or ``duration``
    seconds passed (whichever first); each request is bounded by the target's timeout."""
    lock, sent, samples = threading.Lock(), [0], []
    t0 = time.perf_counter()

    def worker():
        while True:
            with lock:
                if sent[0] >= num_requests or (duration is not None and time.perf_counter() - t0 >= duration):
                    return
                i = sent[0]
                sent[0] += 1
            s = one_request(t, prompts[i % len(prompts)], max_tokens)
            with lock:
                samples.append(s)
            if progress is not None:
                progress(s)

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return summarize(concurrency, samples, time.perf_counter() - t0)


@dataclass
class BenchConfig:
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    num_requests: int | None = None          # per level; default 4 x concurrency, at least 8
    duration: float | None = None            # per level, seconds
    output_len: int = 64


def run_bench(t: Target, prompts: list[str], cfg: BenchConfig, progress_factory=None) -> dict:
    levels = []
    for c in cfg.concurrency:
        n = cfg.num_requests or max(8, 4 * c)
        bar = progress_factory(c, n) if progress_factory else None
        levels.append(run_level(t, prompts, cfg.output_len, c, n, cfg.duration,
                                progress=(lambda s, b=bar: b.update(1)) if bar else None))
        if bar:
            bar.close()
        if levels[-1]["requests"] and not levels[-1]["completed"]:
            break  # every request failed: higher concurrency would only repeat the error
    return {"endpoint": t.kind, "url": t.url, "model": t.model, "output_len": cfg.output_len,
            "num_prompts": len(prompts), "duration": cfg.duration, "levels": levels}


# ----------------------------------------------------------------------------- reports
ROWS = [("req/s", lambda lv: lv["req_s"], "{:.2f}"), ("output tok/s", lambda lv: lv["output_tok_s"], "{:.1f}"),
        ("TTFT p50 ms", lambda lv: _ms(lv["ttft_s"]["p50"]), "{:.0f}"),
        ("TTFT p99 ms", lambda lv: _ms(lv["ttft_s"]["p99"]), "{:.0f}"),
        ("TPOT p50 ms", lambda lv: _ms(lv["tpot_s"]["p50"]), "{:.1f}"),
        ("TPOT p99 ms", lambda lv: _ms(lv["tpot_s"]["p99"]), "{:.1f}"),
        ("latency p90 s", lambda lv: lv["latency_s"]["p90"], "{:.2f}"), ("errors", lambda lv: lv["errors"], "{}")]


def _ms(x):
    return None if x is None else 1000 * x


def _fmt(fmt, v):
    return "-" if v is None else fmt.format(v)


def table(result: dict) -> str:
    head = ["concurrency"] + [str(lv["concurrency"]) for lv in result["levels"]]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, get, fmt in ROWS:
        lines.append(" | ".join([name] + [_fmt(fmt, get(lv)) for lv in result["levels"]]))
    return "\n".join(lines)


def compare(a: dict, b: dict) -> str:
    """A table of every metric at every concurrency level both results have: A, B and B / A."""
    la = {lv["concurrency"]: lv for lv in a["levels"]}
    lb = {lv["concurrency"]: lv for lv in b["levels"]}
    common = sorted(set(la) & set(lb))
    if not common:
        raise ValueError(f"no common concurrency level (A: {sorted(la)}, B: {sorted(lb)})")
    lines = ["concurrency | metric | A | B | B/A", "--- | --- | --- | --- | ---"]
    for c in common:
        for name, get, fmt in ROWS:
            va, vb = get(la[c]), get(lb[c])
            ratio = f"{vb / va:.2f}x" if va and vb is not None else "-"
            lines.append(f"{c} | {name} | {_fmt(fmt, va)} | {_fmt(fmt, vb)} | {ratio}")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> list[Path]:
    """throughput.png (output tok/s and req/s vs concurrency), ttft.png and tpot.png (box plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    cs = [lv["concurrency"] for lv in levels]
    title = f"{result['endpoint']} {result['model']}"
    paths = []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((a1, "output_tok_s", "output tokens/s"), (a2, "req_s", "requests/s")):
        ax.plot(cs, [lv[key] for lv in levels], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"throughput - {title}")
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT")):
        fig, ax = plt.subplots(figsize=(6, 4))
        data = [[1000 * s[key] for s in lv["samples"] if s["ok"] and s[key] is not None] or [0.0] for lv in levels]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(cs) + 1), [str(c) for c in cs])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} distribution - {title}")
        fig.tight_layout()
        paths.append(out / f"{key}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
