#!/usr/bin/env python
"""The CPU demo deployment under load (a benchmark, not a test): `trtllm-loop bench`'s library against the
`reference` repository on the real Triton server and the OpenAI-compatible endpoint beside it, at concurrency
1 / 4 / 16, the same requests through both.

    python bench/bench_serving.py --out bench/results/serving_cpu

Writes OUT/openai/ and OUT/triton-grpc/ (results.json, summary.md, throughput.png, ttft.png, tpot.png) and
OUT/compare.md (`bench --compare` of the two). Tiny synthetic model, float32, CPU: the figures show the
serving path's overheads and scaling, not model speed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/serving_cpu")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    args = ap.parse_args()
    from trtllm_loop.serving import bench
    from trtllm_loop.serving.openai_server import OpenAIServer
    from trtllm_loop.serving.render import render_repository
    from trtllm_loop.serving.server import TritonServer, free_port
    from trtllm_loop.synth import synthesize

    out = Path(args.out)
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ckpt = synthesize(d / "tiny", "tiny", dtype="float32")
        repo = render_repository("reference", ckpt, d / "repo", max_seq_len=512, max_batch_size=max(levels))
        server = TritonServer(repo, log_path=d / "server.log").start(timeout=300)
        api = OpenAIServer(server.grpc_url, free_port()).start()
        try:
            prompts = bench.synthetic_prompts(args.num_requests, args.input_len)
            cfg = bench.BenchConfig(levels, args.num_requests, None, args.output_len)
            results = {}
            for kind, url, model in (("openai", api.url, "tensorrt_llm_bls"),
                                     ("triton-grpc", server.grpc_url, "tensorrt_llm_bls")):
                t = bench.Target(kind, url, model, timeout=300, ignore_eos=True)
                res = bench.run_bench(t, prompts, cfg)
                res["url"] = "127.0.0.1 (CPU demo: reference repository, tiny synth model)"
                dst = out / kind
                dst.mkdir(parents=True, exist_ok=True)
                (dst / "results.json").write_text(json.dumps(res, indent=1))
                (dst / "summary.md").write_text(bench.table(res) + "\n")
                bench.plot(res, dst)
                results[kind] = res
                print(f"## {kind}\n{bench.table(res)}\n", flush=True)
            cmp = bench.compare(results["openai"], results["triton-grpc"])
            (out / "compare.md").write_text("A = OpenAI endpoint, B = Triton gRPC, same requests\n\n" + cmp + "\n")
            print(cmp)
        finally:
            api.stop()
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
