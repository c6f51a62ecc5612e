"""``trtllm-loop demo``: the README's first command -- everything on CPU, nothing downloaded."""
from __future__ import annotations

import tempfile
from pathlib import Path

HELP = """\
Synthesize a tiny random Loop model, then generate from it with the paged runtime emulator: a batch of
prompts of different lengths, chunked prefill and in-flight batching, checked against the reference model's
own full-sequence forward. Then (unless --no-server) render the `reference` Triton repository for a tiny model
with a tokenizer, start a real Triton server on 127.0.0.1, stream a chat reply through the gRPC client and
shut the server down. Runs on CPU in about a minute; downloads nothing.
"""


def register(sub):
    import argparse

    from trtllm_loop.commands.argtypes import positive_int

    p = sub.add_parser("demo", help="end-to-end demo on a tiny synthetic model (CPU)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where to write the demo model (default: a temp dir)")
    p.add_argument("--max-tokens", type=positive_int, default=24)
    p.add_argument("--no-server", action="store_true",
                   help="skip the Triton part: synthesize and generate in-process only")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from trtllm_loop.modeling.load import load_model
    from trtllm_loop.runtime import LoopRuntime, SamplingParams
    from trtllm_loop.synth import synthesize

    work = Path(args.workdir or tempfile.mkdtemp(prefix="trtllm-loop-demo-"))
    ckpt = work / "tiny"
    synthesize(ckpt, "tiny", seed=0, dtype="float32", tokenizer=False, overwrite=True)
    print(f"1. synthesized a tiny IQuestLoopCoder at {ckpt}")
    model = load_model(ckpt, "float32")
    c = model.model.loop_config
    print(f"   {c.num_hidden_layers} layers x 2 passes, {c.num_kv_slots} KV slots, window {c.loop_window_size}, "
          f"{c.num_parameters():,} parameters")
    prompts = [[5, 17, 42, 99, 7, 300, 12], list(range(10, 50)), [1, 2, 3]]
    rt = LoopRuntime(model, tokens_per_block=4, chunk_size=8, max_batch_size=3)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    outs = rt.generate(prompts, params)
    print(f"2. paged runtime: {len(prompts)} prompts ({[len(p) for p in prompts]} tokens), chunk 8, "
          f"4 tokens/block, {rt.steps} batched steps")
    ok = True
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            full = model(torch.tensor([p + o])).logits[0]
        teacher = full[len(p) - 1:-1].argmax(-1).tolist()
        same = teacher == o
        ok &= same
        print(f"   prompt {p[:6]}{'...' if len(p) > 6 else ''} -> {o[:12]}... greedy == full-forward argmax: {same}")
    if not ok:
        print("3. demo FAILED: paged decode diverged from the reference forward")
        return 1
    if args.no_server:
        print("3. demo passed (in-process; run without --no-server for the Triton part)")
        return 0
    from trtllm_loop.serving.demo import run_triton_demo

    print("3. Triton: reference repository, real server on 127.0.0.1, streamed chat through the OpenAI-compatible endpoint")
    rc = run_triton_demo(work / "triton", max_tokens=args.max_tokens)
    print("demo " + ("passed" if rc == 0 else "FAILED"))
    return rc
