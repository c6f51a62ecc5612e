"""``trtllm-loop serve``: run Triton on 127.0.0.1 for a rendered repository until Ctrl-C / SIGTERM."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

HELP = """\
Start a Triton Inference Server for REPO on 127.0.0.1: $TRITONSERVER, else the system `tritonserver`
(NGC container), else the server bundled with nvidia-pytriton (CPU-only machines; serving extra).
Waits until every model is ready, prints the endpoints, and shuts down cleanly on Ctrl-C or SIGTERM.

With --openai-port N an OpenAI-compatible HTTP server (/v1/models, /v1/completions, /v1/chat/completions,
streaming) runs beside it on 127.0.0.1:N, translating to the Triton gRPC client contract.

example:
  trtllm-loop serve /tmp/repo --http-port 8000 --grpc-port 8001
  trtllm-loop client --prompt "def add(a, b):" --max-tokens 32
  trtllm-loop serve /tmp/repo --openai-port 9000
  curl -s 127.0.0.1:9000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}]}'
"""


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a Triton model repository on 127.0.0.1",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", metavar="REPO", help="model repository (trtllm-loop triton-repo --out)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the models to load (300)")
    p.add_argument("--log", metavar="FILE", help="write the server log here instead of the terminal")
    p.add_argument("--verbose", type=int, default=0, help="tritonserver --log-verbose level")
    p.add_argument("--openai-port", type=int, metavar="N", help="also serve the OpenAI-compatible API on port N")
    p.add_argument("--openai-host", default="127.0.0.1",
                   help="address of the OpenAI-compatible API (default 127.0.0.1; anything else exposes it)")
    p.add_argument("--openai-default-max-tokens", type=int, default=16, metavar="N",
                   help="max_tokens of an OpenAI request that does not set it (16, like Triton's OpenAI frontend)")
    p.set_defaults(func=run)


def run(args) -> int:
    from trtllm_loop.serving.server import TritonServer

    server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_path=args.log, verbose=args.verbose,
                          stream_log=None if args.log else sys.stderr)
    done = threading.Event()

    def on_signal(signum, _frame):
        done.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    openai = None
    try:
        print(f"starting tritonserver for {server.repo} ...", flush=True)
        if args.openai_port is not None and args.openai_host in ("127.0.0.1", "localhost"):
            from trtllm_loop.serving.server import check_port_free

            check_port_free(args.openai_port, "OpenAI")  # before the minutes of model loading
        server.start(timeout=args.timeout)
        if args.openai_port is not None:
            from trtllm_loop.serving.openai_server import OpenAIServer

            openai = OpenAIServer(server.grpc_url, args.openai_port, host=args.openai_host,
                                  default_max_tokens=args.openai_default_max_tokens).start()
        print(f"ready ({server.kind} tritonserver):\n"
              f"  HTTP    http://{server.http_url}  (POST /v2/models/ensemble/generate, .../generate_stream)\n"
              f"  gRPC    {server.grpc_url}\n"
              f"  metrics {server.metrics_url}\n"
              + (f"  OpenAI  {openai.url}  (/models, /completions, /chat/completions)\n" if openai else "") +
              f"models: ensemble, tensorrt_llm_bls (client contract), preprocessing, tensorrt_llm, postprocessing\n"
              f"try: trtllm-loop client --url {server.grpc_url} --prompt 'Hello' --max-tokens 16\n"
              "Ctrl-C to stop", flush=True)
        while not done.wait(0.5):
            if server.proc.poll() is not None:
                print(f"error: tritonserver exited with code {server.proc.returncode}", file=sys.stderr)
                return 1
        print("stopping tritonserver ...", flush=True)
        return 0
    finally:
        if openai is not None:
            openai.stop()
        rc = server.stop()
        for s, h in old.items():
            signal.signal(s, h)
        if rc is not None:
            print(f"tritonserver stopped (exit code {rc})", flush=True)
