"""Paged KV cache with one block pool per window size, as TRT-LLM's VSWA ``KVCacheManager`` lays it out.

The 2L slots of :meth:`LoopConfig.slot_plan` fall into two *window groups*: the full-attention slots (pass 1,
``2l``) and the window-W slots (pass 2 local, ``2l+1``). Each group has its own pool of blocks; a block holds
``tokens_per_block`` consecutive positions for **every slot of the group** (``[slots, 2, tpb, Hkv, D]``), so a
sequence has one block table per group, shared by the group's slots -- exactly like TRT-LLM, where the block
offsets are per window size and each layer indexes its own part of the block.

Window groups keep only the blocks the last W positions need: after a step of a sequence of length n
(:meth:`PagedKVCache.trim`) every block whose positions are all ``<= n - W`` (out of reach of the next query)
goes back to the pool. A decode step therefore never holds more than ``ceil(W / tpb) + 1`` blocks of a window
group; a context chunk of C tokens holds its own positions and the W-1 before them until the step ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trtllm_loop.config import LoopConfig


class CacheFullError(RuntimeError):
    """No free block in a pool (the scheduler reserves capacity so that running requests never see this)."""


@dataclass
class WindowGroup:
    window: int | None                       # None = full attention
    slots: list[int]                         # KV slots of this group, in slot order
    pool: torch.Tensor                       # [num_blocks, len(slots), 2, tpb, Hkv, D]
    free: list[int] = field(default_factory=list)
    tables: dict[int, list[int | None]] = field(default_factory=dict)  # seq -> logical block -> physical

    @property
    def num_blocks(self) -> int:
        return self.pool.shape[0]


class PagedKVCache:
    def __init__(self, cfg: LoopConfig, tokens_per_block: int, num_blocks: dict[int | None, int],
                 dtype: torch.dtype, device: str | torch.device = "cpu", debug: bool = False):
        """num_blocks: blocks per window group, keyed by window (None for the full group)."""
        if tokens_per_block <= 0:
            raise ValueError(f"tokens_per_block must be positive, got {tokens_per_block}")
        self.cfg, self.tpb, self.debug = cfg, tokens_per_block, debug
        self.groups: dict[int | None, WindowGroup] = {}
        self.slot_group: dict[int, tuple[WindowGroup, int]] = {}
        by_window: dict[int | None, list[int]] = {}
        for spec in cfg.slot_plan():
            by_window.setdefault(spec.window, []).append(spec.slot)
        for window, slots in by_window.items():
            n = num_blocks[window]
            pool = torch.zeros(n, len(slots), 2, tokens_per_block, cfg.num_key_value_heads, cfg.head_dim,
                               dtype=dtype, device=device)
            g = WindowGroup(window, slots, pool, free=list(range(n - 1, -1, -1)))
            self.groups[window] = g
            for i, s in enumerate(slots):
                self.slot_group[s] = (g, i)
        self.filled: dict[int, dict[int, int]] = {}  # seq -> slot -> positions written so far (debug check)

    # ------------------------------------------------------------ block bookkeeping
    def add_sequence(self, seq: int) -> None:
        for g in self.groups.values():
            g.tables[seq] = []
        self.filled[seq] = {}

    def free_sequence(self, seq: int) -> None:
        for g in self.groups.values():
            for b in g.tables.pop(seq, []):
                if b is not None:
                    g.free.append(b)
        self.filled.pop(seq, None)

    def prepare(self, seq: int, past: int, num_new: int) -> None:
        """Allocate the blocks that positions ``[past, past + num_new)`` land in (TRT-LLM adds the step's
        tokens to the sequence before the forward)."""
        last_block = (past + num_new - 1) // self.tpb
        for g in self.groups.values():
            table = g.tables[seq]
            first = 0 if g.window is None else max(0, past - g.window + 1) // self.tpb
            while len(table) <= last_block:
                table.append(None)
            for b in range(max(first, past // self.tpb), last_block + 1):
                if table[b] is None:
                    if not g.free:
                        raise CacheFullError(f"KV pool of window {g.window or 'full'} is out of blocks "
                                             f"({g.num_blocks} blocks of {self.tpb} tokens)")
                    table[b] = g.free.pop()

    def trim(self, seq: int, length: int) -> None:
        """Return window-group blocks that no future query of a sequence of ``length`` tokens can reach."""
        for g in self.groups.values():
            if g.window is None:
                continue
            table = g.tables[seq]
            for b in range(max(0, length - g.window + 1) // self.tpb):
                if table[b] is not None:
                    g.free.append(table[b])
                    table[b] = None

    def rollback(self, seq: int, length: int) -> None:
        """Forget positions ``>= length`` of a sequence (speculative tokens the target rejected), in every group:
        blocks that hold only such positions go back to the pool, the rest is overwritten before it is read
        (``attend`` writes a step's K/V before reading). Exact only if nothing the shorter sequence still
        needs was trimmed: window blocks are trimmed at committed lengths, never at a speculative one, and
        this checks it."""
        for g in self.groups.values():
            table = g.tables[seq]
            keep = -(-length // self.tpb)
            for b in table[keep:]:
                if b is not None:
                    g.free.append(b)
            del table[keep:]
            first = 0 if g.window is None else max(0, length - g.window + 1) // self.tpb
            if any(b is None for b in table[first:]):
                raise IndexError(f"rollback of sequence {seq} to {length} tokens: a block of window "
                                 f"{g.window or 'full'} the next query needs was already trimmed (trim only at "
                                 "committed lengths)")
        for slot, done in self.filled.get(seq, {}).items():
            self.filled[seq][slot] = min(done, length)

    def held_blocks(self, seq: int, window: int | None) -> int:
        return sum(b is not None for b in self.groups[window].tables.get(seq, []))

    def used_blocks(self, window: int | None) -> int:
        g = self.groups[window]
        return g.num_blocks - len(g.free)

    # ------------------------------------------------------------ data
    def _locate(self, slot: int, seq: int, start: int, end: int):
        """-> group, index of the slot in the group's blocks, physical block and offset of each position."""
        g, i = self.slot_group[slot]
        table = torch.tensor([-1 if b is None else b for b in g.tables[seq]] or [-1], dtype=torch.long)
        pos = torch.arange(start, end)
        logical = pos // self.tpb
        if end > start and (int(logical[-1]) >= len(g.tables[seq]) or bool((table[logical] < 0).any())):
            raise IndexError(f"slot {slot}: a block of positions {start}..{end - 1} of sequence {seq} is not "
                             f"allocated (window {g.window}); it was trimmed or never prepared")
        return g, i, table[logical], pos % self.tpb

    def write(self, slot: int, seq: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store post-RoPE k/v ``[n, Hkv, D]`` at positions ``[start, start + n)``. Writing a position again
        with identical values is the idempotent re-append of the pass-2 global branch (checked in debug)."""
        n = k.shape[0]
        g, i, phys, off = self._locate(slot, seq, start, start + n)
        if self.debug:
            done = self.filled[seq].get(slot, 0)
            if start < done:
                m = min(done, start + n) - start
                old_k, old_v = g.pool[phys[:m], i, 0, off[:m]], g.pool[phys[:m], i, 1, off[:m]]
                assert torch.equal(old_k, k[:m]) and torch.equal(old_v, v[:m]), (
                    f"re-append into slot {slot} (sequence {seq}, positions {start}..{start + m - 1}) "
                    "changed the stored K/V: pass-2 global must feed the identical pass-1 K/V")
            self.filled[seq][slot] = max(done, start + n)
        g.pool[phys, i, 0, off] = k.to(g.pool.dtype)
        g.pool[phys, i, 1, off] = v.to(g.pool.dtype)

    def read(self, slot: int, seq: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v ``[end - start, Hkv, D]`` of positions ``[start, end)``."""
        g, i, phys, off = self._locate(slot, seq, start, end)
        return g.pool[phys, i, 0, off], g.pool[phys, i, 1, off]
