"""``trtllm-loop client``: prompt or chat against a served repository over gRPC (streaming) or HTTP."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trtllm_loop.errors import UserError

HELP = """\
Send a prompt (or a chat) to `ensemble` / `tensorrt_llm_bls` and print the text as it arrives.

examples:
  trtllm-loop client --prompt "def fib(n):" --max-tokens 32
  trtllm-loop client --chat "Write hello world in C" --system "You are terse." --stop "</s>"
  trtllm-loop client --messages chat.json --protocol http --no-stream
  trtllm-loop client --model ensemble --prompt "x = 1" --temperature 0.6 --top-p 0.85 --top-k 20 --seed 1
"""


def register(sub) -> None:
    p = sub.add_parser("client", help="send a prompt or chat to a served repository (gRPC / HTTP)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="server address (default 127.0.0.1:8001 for grpc, 127.0.0.1:8000 for http)")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--model", default="tensorrt_llm_bls", choices=["tensorrt_llm_bls", "ensemble"],
                   help="tensorrt_llm_bls streams exact text; ensemble decodes each streamed token alone")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw prompt (no chat template)")
    src.add_argument("--chat", help="one user message, sent through the model's chat template")
    src.add_argument("--messages", help='chat as JSON: a file or a string like [{"role":"user","content":"hi"}]')
    p.add_argument("--system", help="system prompt (chat)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], metavar="WORD", help="stop word (repeatable)")
    p.add_argument("--no-stream", action="store_true", help="one response with the whole text")
    p.add_argument("--include-prompt", action="store_true", help="echo the prompt (exclude_input_in_output false)")
    p.add_argument("--timeout", type=float, default=120)
    p.set_defaults(func=run)


def run(args) -> int:
    from trtllm_loop.serving.client import TritonRequestError, grpc_generate, http_generate, request_fields

    messages = None
    if args.messages:
        raw = Path(args.messages).read_text(encoding="utf-8") if Path(args.messages).is_file() else args.messages
        try:
            messages = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"--messages is not valid JSON ({e.msg}): give a file or a JSON list of "
                            '{"role": ..., "content": ...}') from None
    fields = request_fields(args.prompt or args.chat or "", args.max_tokens, messages=messages,
                            system_prompt=args.system, chat=args.chat is not None, stop_words=args.stop,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            exclude_input_in_output=not args.include_prompt)
    url = args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")

    def show(s):
        sys.stdout.write(s)
        sys.stdout.flush()

    gen = grpc_generate if args.protocol == "grpc" else http_generate
    try:
        gen(url, args.model, fields, stream=not args.no_stream, on_text=show, timeout=args.timeout)
    except TritonRequestError as e:
        raise UserError(f"server error: {e}") from None
    except ConnectionError as e:
        raise UserError(f"cannot reach {url} ({e}): start the server with `trtllm-loop serve REPO`") from None
    except Exception as e:  # tritonclient raises its own InferenceServerException for transport errors
        if type(e).__name__ == "InferenceServerException":
            raise UserError(f"{url}: {e}") from None
        raise
    sys.stdout.write("\n")
    return 0
