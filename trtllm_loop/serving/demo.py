"""``trtllm-loop demo`` with a real server: synth a tiny model with its tokenizer, render the ``reference``
Triton repository, serve it on 127.0.0.1 with the OpenAI-compatible endpoint beside it, stream a short chat
through that endpoint (``/v1/chat/completions``, SSE), shut down."""
from __future__ import annotations

import sys
import time
from pathlib import Path

CHAT = [{"role": "system", "content": "You are a helpful coding assistant."},
        {"role": "user", "content": "Write a Python function that adds two numbers. 谢谢 🙂"}]


def run_triton_demo(workdir: str | Path, max_tokens: int = 32, out=None) -> int:
    """Returns 0 on success; raises :class:`trtllm_loop.errors.UserError` with the fix when the serving
    extra or the server is missing. Everything stays on loopback; nothing is downloaded."""
    from trtllm_loop.serving.openai_server import OpenAIServer, chat_stream
    from trtllm_loop.serving.render import render_repository
    from trtllm_loop.serving.server import TritonServer, free_port, locate
    from trtllm_loop.synth import synthesize

    out = out or sys.stdout
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    locate()  # fail early, with the install hint, when no tritonserver is available

    def say(msg):
        print(msg, file=out, flush=True)

    ckpt = synthesize(work / "tiny", "tiny", seed=0, dtype="float32", tokenizer=True, overwrite=True)
    say(f"[1/4] synthesized a tiny Loop model with a SentencePiece tokenizer: {ckpt}")
    repo = render_repository("reference", ckpt, work / "triton_repo", max_seq_len=512, max_batch_size=8,
                             overwrite=True)
    say(f"[2/4] rendered the reference Triton repository: {repo}")
    t0 = time.perf_counter()
    server = TritonServer(repo, log_path=work / "tritonserver.log")
    server.start(timeout=300)
    api = None
    try:
        api = OpenAIServer(server.grpc_url, free_port()).start()
        say(f"[3/4] tritonserver ({server.kind}) ready in {time.perf_counter() - t0:.1f} s: "
            f"HTTP {server.http_url}, gRPC {server.grpc_url}; OpenAI-compatible API {api.url}")
        say("[4/4] streaming a chat reply through /v1/chat/completions -> tensorrt_llm_bls "
            "(random weights: expect gibberish)")
        out.write(f"user> {CHAT[-1]['content']}\nassistant> ")
        t1 = time.perf_counter()
        parts = []
        for piece in chat_stream(api.url, CHAT, max_tokens):
            parts.append(piece)
            out.write(piece)
            out.flush()
        text = "".join(parts)
        say(f"\n({len(text)} characters in {time.perf_counter() - t1:.2f} s)")
    finally:
        if api is not None:
            api.stop()
        rc = server.stop()
    say(f"tritonserver stopped (exit code {rc}); server log: {work / 'tritonserver.log'}")
    return 0 if rc == 0 else 1
