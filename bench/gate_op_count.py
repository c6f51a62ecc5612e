"""aten ops of one decode step of the TRT-LLM PyTorch-backend model (on the API double), with pass 2's gate and
mix as the plain torch ops and as the fused gate op (``torch.ops.trtllm_loop.gate_mix``, ``make plugins``).

A count, not a timing: on a GPU every non-view aten op is at least one kernel launch, which is what the fused op
saves (issue 12: ~5.5 ms per token is the B200 weight-streaming floor of the 40B model; a few microseconds per
launch matter even inside a CUDA graph). Each attention call counts as one op (the real one is one kernel; the
double's emulator runs host code). The per-layer figure does not depend on the model's size, so the tiny preset
gives the 80-layer figure by multiplication.

usage: python bench/gate_op_count.py [--preset tiny] [--out bench/results/gate_op_count]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Records every aten op by name; ``skip`` > 0 hides the ops of an emulated kernel."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.views: list[bool] = []
        self.skip = 0
        self.region: list[int] | None = None  # indices recorded inside loop.gated_mix, per call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.skip:
            self.record(str(func), bool(getattr(func, "is_view", False)))
        return func(*args, **(kwargs or {}))

    def record(self, name: str, view: bool = False):
        if self.region is not None:
            self.region.append(len(self.ops))
        self.ops.append(name)
        self.views.append(view)


@contextmanager
def counting(steps: list):
    """Patches the model's forward (one OpCounter per step), the attention op (one op each) and loop.gated_mix
    (marks pass 2's gate and mix); yields ``steps``, filled with one dict per forward call."""
    from tensorrt_llm._torch.attention_backend import trtllm as attention

    from trtllm_loop.modeling import loop
    from trtllm_loop.trtllm.torch_backend import modeling_iquest_loop as m

    state: dict = {}
    forward, attend, gated = m.TrtllmLoopForCausalLM.forward, attention.TrtllmAttention.forward, loop.gated_mix

    def counted_forward(self, *a, **k):
        with OpCounter() as c:
            state["c"], state["layers"] = c, []
            out = forward(self, *a, **k)
        n = k["input_ids"].numel()
        steps.append(dict(tokens=n, ops=c.ops, views=c.views,
                          gate_mix=[[c.ops[i] for i in r] for r in state["layers"]]))
        return out

    def counted_attend(self, *a, **k):
        c = state["c"]
        c.record("attention (one kernel)")
        c.skip += 1
        try:
            return attend(self, *a, **k)
        finally:
            c.skip -= 1

    def counted_gated(*a, **k):
        c = state["c"]
        c.region = []
        try:
            return gated(*a, **k)
        finally:
            state["layers"].append(c.region)
            c.region = None

    m.TrtllmLoopForCausalLM.forward, attention.TrtllmAttention.forward, loop.gated_mix = \
        counted_forward, counted_attend, counted_gated
    try:
        yield steps
    finally:
        m.TrtllmLoopForCausalLM.forward, attention.TrtllmAttention.forward, loop.gated_mix = forward, attend, gated


def count(ckpt, fused: bool, prompt_len: int = 6) -> dict:
    """Ops of the last (single-token decode) step of a teacher-forced run, pass 2 fused or not."""
    from trtllm_loop.trtllm.torch_backend import run_logits
    from trtllm_loop.trtllm.torch_backend.modeling_iquest_loop import FUSED_GATE_ENV

    old = os.environ.get(FUSED_GATE_ENV)
    os.environ[FUSED_GATE_ENV] = "1" if fused else "0"
    try:
        with counting([]) as steps:
            run_logits(ckpt, [list(range(3, 3 + prompt_len))], chunk=prompt_len, prefill_len=prompt_len - 1)
    finally:
        if old is None:
            os.environ.pop(FUSED_GATE_ENV)
        else:
            os.environ[FUSED_GATE_ENV] = old
    step = steps[-1]
    assert step["tokens"] == 1, step["tokens"]
    return dict(step_ops=len(step["ops"]), step_non_view_ops=step["views"].count(False),
                attention_calls=step["ops"].count("attention (one kernel)"), gate_mix_per_layer=step["gate_mix"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gate_op_count"))
    args = ap.parse_args(argv)
    from trtllm_loop.kernels.gate_mix import load_op
    from trtllm_loop.synth import PRESETS, synthesize

    if not load_op():
        raise SystemExit("torch.ops.trtllm_loop.gate_mix is not built: run `make plugins` first")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = synthesize(Path(tmp) / "ckpt", args.preset, dtype="float32", tokenizer=False)
        plain, fused = count(ckpt, False), count(ckpt, True)
    L = PRESETS[args.preset]["num_hidden_layers"]
    per_layer = len(plain["gate_mix_per_layer"][0])
    non_view = sum(not getattr(getattr(torch.ops.aten, n.split(".")[1]), n.split(".")[2]).is_view
                   for n in plain["gate_mix_per_layer"][0])
    res = dict(date=datetime.date.today().isoformat(), preset=args.preset, layers=L, torch=torch.__version__,
               plain=plain, fused=fused, gate_mix_ops_per_layer=dict(plain=per_layer, plain_non_view=non_view, fused=1),
               at_80_layers=dict(plain=80 * per_layer, plain_non_view=80 * non_view, fused=80))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    ops = ", ".join(n.removeprefix("aten.") for n in plain["gate_mix_per_layer"][0])
    out.with_suffix(".md").write_text(
        f"# aten ops per decode step, pass 2 gate + mix ({res['date']}, torch {res['torch']}, preset {args.preset}, "
        f"{L} layers, API double, 1 token)\n\n"
        "| | plain torch ops | fused gate op |\n|---|---|---|\n"
        f"| gate + mix ops per layer | {per_layer} ({non_view} non-view) | 1 |\n"
        f"| whole decode step ({L} layers, attention = 1 op) | {plain['step_ops']} ({plain['step_non_view_ops']} "
        f"non-view) | {fused['step_ops']} ({fused['step_non_view_ops']} non-view) |\n"
        f"| 80 layers (40B), gate + mix | {80 * per_layer} ({80 * non_view} non-view) | 80 |\n\n"
        f"Plain ops of one layer's gate + mix: {ops}.\n\n"
        "Regenerate: `make plugins && .venv/bin/python bench/gate_op_count.py`.\n")
    print(out.with_suffix(".md").read_text())
    return res


if __name__ == "__main__":
    main()
