"""Mimics ``tensorrt_llm/_torch/distributed`` (``AllReduce``, ``allgather``) for simulated TP ranks.

Real TRT-LLM runs one process per rank (MPI) and reduces with NCCL / custom all-reduce kernels. Here ranks are
threads of one process (:class:`SimulatedWorld`, double-only), and the all-reduce sums the ranks' tensors in rank
order, so every rank gets bit-identical results, as NCCL guarantees across ranks."""
import threading
from typing import Callable, List, Optional

import torch
from torch import nn

from tensorrt_llm.functional import AllReduceParams  # noqa: F401  (re-exported like the real module)
from tensorrt_llm.mapping import Mapping

_WORLD: Optional["SimulatedWorld"] = None


class SimulatedWorld:
    """``run(fn)`` calls ``fn(rank)`` on ``tp_size`` threads; collectives meet at a barrier."""

    def __init__(self, tp_size: int, timeout: float = 300.0):
        self.tp_size = tp_size
        self.barrier = threading.Barrier(tp_size, timeout=timeout)
        self.slots: List[Optional[torch.Tensor]] = [None] * tp_size

    def _exchange(self, rank: int, t: torch.Tensor) -> List[torch.Tensor]:
        self.slots[rank] = t
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read it
        return got

    def all_reduce(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(rank, t)
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def all_gather(self, rank: int, t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self._exchange(rank, t), dim=dim)

    def run(self, fn: Callable[[int], object]) -> list:
        global _WORLD
        if _WORLD is not None:
            raise RuntimeError("a simulated world is already running")
        results: list = [None] * self.tp_size
        errors: list = []

        def body(rank: int):
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # release the other ranks, then report
                errors.append(e)
                self.barrier.abort()

        _WORLD = self
        try:
            threads = [threading.Thread(target=body, args=(r,), name=f"tp-rank-{r}") for r in range(self.tp_size)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        finally:
            _WORLD = None
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return results


def _world(mapping: Mapping) -> SimulatedWorld:
    if _WORLD is None or _WORLD.tp_size != mapping.tp_size:
        raise RuntimeError(f"tp_size {mapping.tp_size} needs a running SimulatedWorld of that size (the double has "
                           "no MPI/NCCL); real TRT-LLM launches one process per rank")
    return _WORLD


class AllReduce(nn.Module):
    """Mimics ``AllReduce(mapping, strategy)``: sum over the TP group."""

    def __init__(self, mapping: Mapping, strategy=None, dtype=None):
        super().__init__()
        self.mapping = mapping

    def forward(self, input: torch.Tensor, *, all_reduce_params: Optional[AllReduceParams] = None) -> torch.Tensor:
        if self.mapping.tp_size == 1:
            return input
        return _world(self.mapping).all_reduce(self.mapping.tp_rank, input)


def allgather(input: torch.Tensor, mapping: Mapping, dim: int = -1, sizes=None) -> torch.Tensor:
    """Mimics ``allgather``: concatenate the TP ranks' tensors along ``dim`` in rank order."""
    if mapping.tp_size == 1:
        return input
    return _world(mapping).all_gather(mapping.tp_rank, input, dim)
