"""`trtllm-loop serve` (Ctrl-C shutdown) and the Triton demo, each against a real server."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time


from conftest import require, require_triton_server

require("tritonclient.grpc")
require("sentencepiece")


require_triton_server()


def test_serve_cli_prints_endpoints_and_stops_on_ctrl_c(tmp_path):
    from trtllm_loop.serving.client import grpc_generate, request_fields
    from trtllm_loop.serving.render import render_repository
    from trtllm_loop.serving.server import free_port
    from trtllm_loop.synth import synthesize

    ckpt = synthesize(tmp_path / "tiny", "tiny", dtype="float32")
    repo = render_repository("reference", ckpt, tmp_path / "repo", max_seq_len=256)
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trtllm_loop.cli", "serve", str(repo), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--log",
                             str(tmp_path / "server.log")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        out = "".join(lines)
        assert "Ctrl-C to stop" in out, out
        assert f"http://127.0.0.1:{http}" in out and f"127.0.0.1:{grpc}" in out
        assert grpc_generate(f"127.0.0.1:{grpc}", "tensorrt_llm_bls", request_fields("hi", 4), stream=True)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + rest
    assert "tritonserver stopped (exit code 0)" in rest


def test_triton_demo(tmp_path):
    from trtllm_loop.serving.demo import run_triton_demo

    buf = io.StringIO()
    assert run_triton_demo(tmp_path, max_tokens=12, out=buf) == 0
    text = buf.getvalue()
    assert "[3/4] tritonserver" in text and "assistant> " in text
    assert "tritonserver stopped (exit code 0)" in text
    assert (tmp_path / "tiny" / "tokenizer.model").is_file()
