"""``trtllm-loop generate``: sample from a checkpoint with the paged runtime (in-flight batched, on CPU)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from trtllm_loop.commands.argtypes import finite_float, nonneg_float, nonneg_int, positive_int
from trtllm_loop.errors import UserError

HELP = """\
Generate with the paged runtime emulator (the reference for every serving backend). Prompts are token
ids (--prompt-ids: a JSON file or a comma-separated list; repeat for a batch) or text (--prompt, needs the
checkpoint's tokenizer; --chat wraps it in the chat template). Several prompts run together with in-flight
batching. Stops at any eos id of config.json, a --stop sequence, or --max-tokens.

--speculative verifies K proposed tokens per step through both loop passes (one weight stream for up to
K + 1 tokens) and rolls the rejected ones back in the pass-1 and the pass-2 window caches; greedy output is
exactly that of normal decoding, sampled output has the same distribution (rejection sampling):
  ngram[:K]        prompt lookup (the tokens that followed the last occurrence of the latest 1-3 tokens)
  draft:PATH[:K]   a draft checkpoint with the same vocabulary (e.g. a small synth preset)
K defaults to 4. The acceptance rate is printed (and in --json).

examples:
  trtllm-loop generate /tmp/tiny --prompt-ids 1,2,3 --max-tokens 8
  trtllm-loop generate /tmp/tiny --prompt "def fib(n):" --temperature 0.6 --top-p 0.85 --top-k 20 --seed 0
  trtllm-loop generate /tmp/small --prompt-ids code.json --speculative ngram:4
  trtllm-loop generate /tmp/small --prompt-ids code.json --speculative draft:/tmp/tiny:4
"""


def register(sub):
    import argparse

    p = sub.add_parser("generate", help="sample tokens/text with the paged runtime", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", action="append", help="JSON file or comma-separated ids; repeatable")
    src.add_argument("--prompt", action="append", help="prompt text (needs tokenizer files); repeatable")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to --prompt")
    p.add_argument("--max-tokens", type=positive_int, default=32)
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=finite_float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=nonneg_int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (text, or ids with --prompt-ids)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--emulate-activations", choices=["nvfp4"], default=None,
                   help="quantize Linear inputs like W4A4 NVFP4 kernels (NVFP4 exports with input_scale)")
    p.add_argument("--tokens-per-block", type=positive_int, default=16)
    p.add_argument("--chunk", type=positive_int, default=256)
    p.add_argument("--speculative", metavar="SPEC", default=None,
                   help="ngram[:K] or draft:PATH[:K] (see above)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt at the end")
    p.set_defaults(func=run)


def parse_ids(spec: str) -> list[int]:
    path = Path(spec)
    try:
        if path.suffix == ".json" or path.is_file():
            ids = json.loads(path.read_text())
        else:
            ids = [int(x) for x in spec.replace(" ", "").split(",") if x]
    except (ValueError, RecursionError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"--prompt-ids {spec!r}: expected a JSON file of ids or '1,2,3' ({e})") from None
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise UserError(f"--prompt-ids {spec!r}: expected a non-empty list of integer ids")
    return ids


def load_tokenizer(ckpt: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(ckpt)
    except Exception as e:
        raise UserError(f"{ckpt}: no usable tokenizer ({type(e).__name__}: {' '.join(str(e).split())[:200]}); use --prompt-ids, or add "
                        "tokenizer files (tokenizer.model + tokenizer_config.json)") from None


def run(args) -> int:
    from trtllm_loop.runtime import LoopRuntime, SamplingParams

    if args.speculative:  # a malformed spec fails before any model is loaded
        from trtllm_loop.runtime.speculative import parse_spec

        try:
            parse_spec(args.speculative)
        except ValueError as e:
            raise UserError(f"--speculative: {e}") from None
    tok = None
    if args.prompt:
        tok = load_tokenizer(args.ckpt)
        if args.chat:
            prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               tokenize=True) for t in args.prompt]
            prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
        else:
            prompts = [tok.encode(t, add_special_tokens=False) for t in args.prompt]
        stops = [tok.encode(s, add_special_tokens=False) for s in args.stop]
    else:
        prompts = [parse_ids(s) for s in args.prompt_ids]
        stops = [parse_ids(s) for s in args.stop]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_sequences=stops, ignore_eos=args.ignore_eos)
    try:
        params.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    from trtllm_loop.modeling.load import load_model

    model = load_model(args.ckpt, args.dtype, args.emulate_activations)
    spec = None
    if args.speculative:
        from trtllm_loop.runtime.speculative import make_proposer

        try:
            spec = make_proposer(args.speculative, model.model.loop_config, tokens_per_block=args.tokens_per_block,
                                 max_batch_size=max(1, len(prompts)), dtype=args.dtype,
                                 max_seq_len=max(map(len, prompts)) + args.max_tokens + 1)
        except ValueError as e:
            raise UserError(f"--speculative: {e}") from None
    rt = LoopRuntime(model, tokens_per_block=args.tokens_per_block, chunk_size=args.chunk,
                     max_batch_size=max(1, len(prompts)), speculative=spec)
    try:
        rids = [rt.add_request(p, params) for p in prompts]
    except ValueError as e:
        raise UserError(str(e)) from None
    outputs = {r: [] for r in rids}
    drafted = {r: [0, 0] for r in rids}                      # proposed, accepted
    reasons = {}
    stream = len(prompts) == 1 and not args.json
    if stream and tok is not None:
        from trtllm_loop.serving.textproc import IncrementalDetokenizer

        detok = IncrementalDetokenizer(tok)
    while rt.has_unfinished():
        for o in rt.step():
            outputs[o.request_id] += o.token_ids
            drafted[o.request_id][0] += o.proposed
            drafted[o.request_id][1] += o.accepted
            if o.finished:
                reasons[o.request_id] = o.finish_reason
            if stream and o.token_ids:
                if tok is None:
                    print(" ".join(map(str, o.token_ids)), end=" ", flush=True)
                else:  # whole UTF-8 characters only, with SentencePiece's spaces
                    sys.stdout.write(detok.push(o.token_ids))
                    sys.stdout.flush()
    if stream:
        if tok is not None:
            sys.stdout.write(detok.flush())
        print(f"\n[{reasons[rids[0]]}, {len(outputs[rids[0]])} tokens]")
    if spec is not None and not args.json:
        st = rt.spec_stats
        print(f"[speculative {args.speculative}: {st['accepted']}/{st['proposed']} drafts accepted "
              f"({st['accepted'] / max(1, st['proposed']):.1%}), {st['emitted'] / max(1, st['steps']):.2f} tokens "
              f"per verification step, {rt.steps} steps]", file=sys.stderr)
    for i, r in enumerate(rids):
        rec = {"prompt_ids": prompts[i], "output_ids": outputs[r], "finish_reason": reasons[r]}
        if spec is not None:
            prop, acc = drafted[r]
            rec.update(proposed=prop, accepted=acc, acceptance_rate=acc / prop if prop else 0.0)
        if tok is not None:
            rec["text"] = tok.decode(outputs[r], skip_special_tokens=True)
        if args.json:
            print(json.dumps(rec))
        elif not stream:
            print(f"[{i}] {rec.get('text', outputs[r])}  ({reasons[r]}, {len(outputs[r])} tokens)")
    return 0
