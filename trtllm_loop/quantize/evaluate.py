"""Quantized-vs-reference logits: per-position KL(ref || quant), top-1 agreement, max |delta logit|."""
from __future__ import annotations

import numpy as np
import torch


def compare_logits(ref: np.ndarray, quant: np.ndarray) -> dict:
    """``ref``, ``quant``: [T, V] logits of the same tokens. KL in nats, per position and summarised."""
    r, q = torch.from_numpy(np.asarray(ref, np.float64)), torch.from_numpy(np.asarray(quant, np.float64))
    if r.shape != q.shape:
        raise ValueError(f"logit shapes differ: {tuple(r.shape)} vs {tuple(q.shape)}")
    lr, lq = torch.log_softmax(r, -1), torch.log_softmax(q, -1)
    kl = (lr.exp() * (lr - lq)).sum(-1)
    top1 = r.argmax(-1) == q.argmax(-1)
    dmax = (r - q).abs().amax(-1)
    return {"positions": int(r.shape[0]), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float(top1.double().mean()), "max_abs_dlogit": float(dmax.max()),
            "per_position": {"kl": kl.tolist(), "top1": top1.tolist(), "max_abs_dlogit": dmax.tolist()}}


def eval_quant(ref: str, quant: str, seqs: list[list[int]], emulate_activations: str | None = None) -> dict:
    """Prefill logits of both checkpoints through the reference model (fp32) for every sequence."""
    from trtllm_loop.modeling.load import load_model

    def logits(ckpt, emulate):
        model = load_model(ckpt, torch.float32, emulate_activations=emulate or None)
        with torch.no_grad():
            return [model(torch.tensor([s])).logits[0].float().numpy() for s in seqs]

    per_seq = [compare_logits(a, b) for a, b in zip(logits(ref, False), logits(quant, emulate_activations))]
    n = sum(s["positions"] for s in per_seq)
    summary = {"positions": n,
               "kl_mean": sum(s["kl_mean"] * s["positions"] for s in per_seq) / n,
               "kl_max": max(s["kl_max"] for s in per_seq),
               "top1_agreement": sum(s["top1_agreement"] * s["positions"] for s in per_seq) / n,
               "max_abs_dlogit": max(s["max_abs_dlogit"] for s in per_seq)}
    return {"ref": ref, "quant": quant, "emulate_activations": emulate_activations, "summary": summary,
            "sequences": per_seq}
