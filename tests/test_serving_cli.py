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
    http, grpc, metrics, oai = free_port(), free_port(), free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trtllm_loop.cli", "serve", str(repo), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--openai-port", str(oai),
                             "--log",
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
        assert f"OpenAI  http://127.0.0.1:{oai}/v1" in out
        from trtllm_loop.serving.openai_server import chat_stream

        assert "".join(chat_stream(f"http://127.0.0.1:{oai}/v1", [{"role": "user", "content": "hi"}], 4)) == \
            grpc_generate(f"127.0.0.1:{grpc}", "tensorrt_llm_bls", request_fields("hi", 4, chat=True), stream=True)
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
    assert "OpenAI-compatible API http://127.0.0.1:" in text and "/v1/chat/completions" in text
    reply = text.split("assistant> ", 1)[1].split("\n(", 1)[0]
    assert reply, "the chat through the OpenAI endpoint streamed nothing"
    assert "tritonserver stopped (exit code 0)" in text
    assert (tmp_path / "tiny" / "tokenizer.model").is_file()


def test_serve_refuses_a_taken_port(tmp_path):
    """Another process on the HTTP port: `serve` fails with a clear error and a non-zero exit instead of reporting
    the other server's readiness as its own."""
    import socket

    from trtllm_loop.serving.render import render_repository
    from trtllm_loop.synth import synthesize

    ckpt = synthesize(tmp_path / "tiny", "tiny", dtype="float32")
    repo = render_repository("reference", ckpt, tmp_path / "repo", max_seq_len=64)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "trtllm_loop.cli", "serve", str(repo), "--http-port", str(port),
                            "--grpc-port", "0", "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"HTTP port {port} on 127.0.0.1 is already in use" in r.stderr, r.stderr
    assert "ready" not in r.stdout


def test_readiness_must_come_from_our_server(tmp_path):
    """A server that answers ready on our port but is not the one we started (its metadata lacks our --id) is
    refused, not taken for ours."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import pytest

    from trtllm_loop.errors import UserError
    from trtllm_loop.serving.server import TritonServer

    class Other(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"name": "triton", "version": "2.51.0"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    other = HTTPServer(("127.0.0.1", 0), Other)
    t = threading.Thread(target=other.serve_forever, daemon=True)
    t.start()
    try:
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.pbtxt").write_text('name: "m"')
        s = TritonServer(tmp_path, http_port=other.server_address[1])
        with pytest.raises(UserError, match="another server answers"):
            s.ready()
        s.server_id = "triton"  # the same probe accepts the server that names our id
        assert s.ready()
    finally:
        other.shutdown()
        other.server_close()
