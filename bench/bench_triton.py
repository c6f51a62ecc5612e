#!/usr/bin/env python
"""Benchmark (not a test): requests/s, time to first token and per-token latency over gRPC streaming against
the rendered `reference` repository on a real Triton server, at concurrency 1 / 8 / 32.

    python bench/bench_triton.py --out bench/results/triton_cpu      # synth + render + serve + measure
    python bench/bench_triton.py --url 127.0.0.1:8001 --out /tmp/b    # an already running server

Writes ``<out>.md`` (table), ``<out>.json`` (raw numbers) and ``<out>.png`` (plot; needs matplotlib).
Latencies are client-side wall clock over loopback; the ensemble streams one response per generated token,
so its response count is the token count.
"""
from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

PROMPTS = ["def fibonacci(n):", "Hello, world! 你好", "SELECT id FROM users WHERE", "The quick brown fox",
           "class Stack:\n    def push(self, x):", "Café naïve ✓ → ∞", "for i in range(10):", "import json\n"]


def one_request(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    import tritonclient.grpc as grpcclient

    from trtllm_loop.serving.client import grpc_inputs, request_fields

    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: q.put((time.perf_counter(), result, error)))
    times = []
    t0 = time.perf_counter()
    try:
        fields = request_fields(prompt, max_tokens, stream=True)
        c.async_stream_infer(model, grpc_inputs(fields), request_id=uuid.uuid4().hex, enable_empty_final_response=True)
        while True:
            t, result, error = q.get(timeout=300)
            if error is not None:
                raise RuntimeError(str(error))
            resp = result.get_response()
            if result.as_numpy("text_output") is not None:
                times.append(t)
            if resp.parameters["triton_final_response"].bool_param:
                break
    finally:
        c.stop_stream()
        c.close()
    t_end = time.perf_counter()
    return {"start": t0, "end": t_end, "ttft": (times[0] - t0) if times else float("nan"),
            "tokens": len(times), "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")}


def run_level(url: str, model: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    todo = iter(range(n_requests))

    def worker():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            r = one_request(url, model, PROMPTS[i % len(PROMPTS)] + f" #{i}", max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] == r["tpot"]]
    toks = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
            "tokens_per_s": toks / wall, "ttft_p50_ms": 1e3 * statistics.median(ttft),
            "ttft_p90_ms": 1e3 * float(np.percentile(ttft, 90)),
            "tpot_p50_ms": 1e3 * statistics.median(tpot) if tpot else float("nan"),
            "tpot_p90_ms": 1e3 * float(np.percentile(tpot, 90)) if tpot else float("nan"),
            "mean_tokens": toks / len(results)}


def table(rows: list[dict], meta: dict) -> str:
    head = ("| concurrency | requests | req/s | tokens/s | TTFT p50 (ms) | TTFT p90 (ms) | per-token p50 (ms) "
            "| per-token p90 (ms) | tokens/request |\n|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['concurrency']} | {r['requests']} | {r['req_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                   f"{r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} | {r['tpot_p50_ms']:.1f} | "
                   f"{r['tpot_p90_ms']:.1f} | {r['mean_tokens']:.1f} |\n" for r in rows)
    note = ("Per-token figures are per streamed response: `ensemble` streams one response per generated token; "
            "`tensorrt_llm_bls` one per stable text piece (a run of byte-fallback tokens arrives as one piece), so "
            "its 'tokens' are pieces. Client-side wall clock over loopback; the machine may be shared.\n\n")
    return f"# Triton gRPC streaming benchmark\n\n{json.dumps(meta)}\n\n" + note + head + body


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written", file=sys.stderr)
        return False
    c = [r["concurrency"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    ax[0].plot(c, [r["req_per_s"] for r in rows], "o-")
    ax[0].set(title="throughput", xlabel="concurrency", ylabel="requests / s")
    ax[1].plot(c, [r["ttft_p50_ms"] for r in rows], "o-", label="p50")
    ax[1].plot(c, [r["ttft_p90_ms"] for r in rows], "s--", label="p90")
    ax[1].set(title="time to first token", xlabel="concurrency", ylabel="ms")
    ax[1].legend()
    ax[2].plot(c, [r["tpot_p50_ms"] for r in rows], "o-", label="p50")
    ax[2].plot(c, [r["tpot_p90_ms"] for r in rows], "s--", label="p90")
    ax[2].set(title="per-token latency", xlabel="concurrency", ylabel="ms")
    ax[2].legend()
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xticks(c, [str(x) for x in c])
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="gRPC address of a running server (default: start one)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="synthetic model to serve")
    p.add_argument("--model", default="ensemble", choices=["ensemble", "tensorrt_llm_bls"])
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests-per-level", type=int, default=0, help="default: max(8, 2 x concurrency)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/triton_cpu", help="output prefix (.md, .json, .png)")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    server = None
    try:
        url = args.url
        if not url:
            from trtllm_loop.serving.render import render_repository
            from trtllm_loop.serving.server import TritonServer
            from trtllm_loop.synth import synthesize

            work = Path(tempfile.mkdtemp(prefix="bench_triton."))
            ckpt = synthesize(work / args.preset, args.preset, dtype="float32")
            repo = render_repository("reference", ckpt, work / "repo", max_seq_len=512,
                                     max_batch_size=max(levels), torch_threads=args.torch_threads)
            server = TritonServer(repo, log_path=work / "server.log").start(timeout=300)
            url = server.grpc_url
            print(f"serving {args.preset} from {repo} at {url}", file=sys.stderr)
        one_request(url, args.model, "warm up", 4)
        rows = []
        for c in levels:
            n = args.requests_per_level or max(8, 2 * c)
            rows.append(run_level(url, args.model, c, n, args.max_tokens))
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    import os
    import platform

    meta = {"model": args.model, "preset": args.preset, "max_tokens": args.max_tokens, "cpu": platform.processor()
            or platform.machine(), "cores": os.cpu_count(), "server": "tritonserver (reference flavour, CPU)",
            "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = table(rows, meta)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, out.with_suffix(".png"), f"{args.preset} Loop model, {args.model}, gRPC streaming, "
                                        f"{meta['cores']} CPU cores")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
