"""``trtllm-loop bench``: TTFT / TPOT / throughput per concurrency against a serving endpoint; compare runs."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trtllm_loop.commands.argtypes import add_force, positive_float, positive_int
from trtllm_loop.errors import UserError

HELP = """\
Benchmark a running deployment with streamed requests, at each concurrency level in turn: time to first
token (TTFT), time per output token (TPOT), output tokens/s, requests/s, end-to-end latency (mean, p50, p90,
p99) and errors. The same requests go to any of
  openai URL        an OpenAI-compatible server: `serve REPO --openai-port N`, trtllm-serve  (/v1/completions)
  triton-grpc URL   Triton gRPC streaming (host:port, e.g. 127.0.0.1:8001), model ensemble or tensorrt_llm_bls
  triton-http URL   Triton's HTTP generate_stream (host:port, e.g. 127.0.0.1:8000)
Each level runs --num-requests requests (default 4 x concurrency, at least 8), or for --duration seconds,
whichever ends first; every request has a --timeout. The endpoint is probed first (a TCP connect, at most
10 s): an unreachable one is one error, not a timeout per request; a level where every request fails ends the run. Greedy sampling; outputs may end early at an end id
(--ignore-eos asks the server not to: end_id -1 on Triton, ignore_eos on trtllm-serve).

Writes OUT/results.json (every request's timings, the per-level summary), OUT/summary.md (the table) and
OUT/throughput.png, OUT/ttft.png, OUT/tpot.png. `bench --compare A B` prints a table of two results (files
or their directories), B relative to A.

examples:
  trtllm-loop serve /tmp/repo --openai-port 9000 &
  trtllm-loop bench --endpoint openai http://127.0.0.1:9000 --model tensorrt_llm_bls --concurrency 1,4,16 \\
      --prompts synthetic --input-len 32 --output-len 32 --out /tmp/bench-oai
  trtllm-loop bench --endpoint triton-grpc 127.0.0.1:8001 --model ensemble --prompts prompts.jsonl --out /tmp/bench-grpc
  trtllm-loop bench --compare /tmp/bench-oai /tmp/bench-grpc
"""


def concurrency_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 or v > 1024 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers in 1..1024, got {s!r}")
    return vals


def register(sub):
    p = sub.add_parser("bench", help="TTFT/TPOT/throughput per concurrency against an endpoint; --compare",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", nargs=2, metavar=("KIND", "URL"), help="openai|triton-grpc|triton-http and its URL")
    p.add_argument("--model", help="served model name (OpenAI 'model'; Triton: ensemble or tensorrt_llm_bls)")
    p.add_argument("--concurrency", type=concurrency_list, default=[1, 4, 16, 64], help="levels, e.g. 1,4,16,64")
    p.add_argument("--prompts", default="synthetic", help="FILE (.jsonl/.json/.txt) or 'synthetic' (default)")
    p.add_argument("--input-len", type=positive_int, default=64, help="synthetic prompt length in words (64)")
    p.add_argument("--output-len", type=positive_int, default=64, help="max_tokens of each request (64)")
    p.add_argument("--num-requests", type=positive_int, default=None, help="requests per level")
    p.add_argument("--duration", type=positive_float, default=None, help="seconds per level (an upper bound)")
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per request (120)")
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to generate --output-len tokens")
    p.add_argument("--seed", type=int, default=0, help="synthetic prompt seed")
    p.add_argument("--out", help="output directory (results.json, summary.md, PNG plots)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print a table comparing two results")
    add_force(p, "--out")
    p.set_defaults(func=run)


def _load_result(path: str) -> dict:
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--compare {path}: not a bench results.json ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("levels"), list):
        raise UserError(f"--compare {path}: not a bench results.json (no 'levels')")
    return d


def run(args) -> int:
    from trtllm_loop.serving import bench

    if args.compare:
        try:
            print(bench.compare(_load_result(args.compare[0]), _load_result(args.compare[1])))
        except ValueError as e:
            raise UserError(f"--compare: {e}") from None
        return 0
    if not args.endpoint or not args.model or not args.out:
        raise UserError("bench needs --endpoint KIND URL, --model NAME and --out DIR (or --compare A B)")
    from trtllm_loop.fsutil import atomic_dir, check_output

    check_output(args.out, args.force)
    kind, url = args.endpoint
    try:
        target = bench.Target(kind, url, args.model, timeout=args.timeout, ignore_eos=args.ignore_eos)
    except ValueError as e:
        raise UserError(f"--endpoint {kind} {url}: {e}") from None
    n = args.num_requests or max(8, 4 * max(args.concurrency))
    try:
        prompts = (bench.synthetic_prompts(n, args.input_len, args.seed) if args.prompts == "synthetic"
                   else bench.load_prompts(args.prompts))
    except (ValueError, OSError) as e:
        raise UserError(f"--prompts {args.prompts}: {e}") from None
    try:
        bench.probe(target)
    except OSError as e:
        host, port = target.address()
        raise UserError(f"--endpoint {kind} {url}: cannot connect to {host}:{port} ({type(e).__name__}: {e}); "
                        "start the server (e.g. `trtllm-loop serve REPO --openai-port N`) or fix the URL") from None
    from tqdm import tqdm

    def bar(c, total):
        return tqdm(total=total, desc=f"concurrency {c}", unit="req", file=sys.stderr, disable=None)

    cfg = bench.BenchConfig(args.concurrency, args.num_requests, args.duration, args.output_len)
    result = bench.run_bench(target, prompts, cfg, bar)
    if all(lv["completed"] == 0 for lv in result["levels"]):
        msgs = {m for lv in result["levels"] for m in lv["error_messages"]}
        raise UserError(f"--endpoint {kind} {url}: every request failed ({'; '.join(sorted(msgs))[:400]}); is the "
                        "server up, and is --model right?")
    with atomic_dir(args.out, args.force) as tmp:
        (tmp / "results.json").write_text(json.dumps(result, indent=1))
        (tmp / "summary.md").write_text(bench.table(result) + "\n")
        bench.plot(result, tmp)
    print(bench.table(result))
    print(f"wrote {args.out}/results.json, summary.md, throughput.png, ttft.png, tpot.png")
    return 0
