"""Data parallelism for `rollout` and `update` under ``accelerate launch`` (``runtime.launcher``).

Single-process is the default and pays nothing here. Launched by ``accelerate launch
--multi_gpu --num_processes N`` (torchrun underneath), ``WORLD_SIZE`` > 1 and the processes join
one group: over NCCL with one GPU each (``LOCAL_RANK``) when ``runtime.device`` is ``cuda`` or
``auto`` on a GPU machine, over gloo on the CPU otherwise. They split the work so that the result
does not depend on how many processes there are:

- rollout: each forward chunk of prompts has its own seeded generator, so chunk k
  generates the same tokens whichever process runs it; process 0 gathers and writes;
- update: every process holds the whole batch and the same shuffled minibatch order;
  each runs its share of a minibatch's micro-batches, the token-weighted gradients are
  summed across processes before one identical optimizer step everywhere, so the
  update equals the single-process gradient accumulation up to float summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    """where this process's collectives put their tensors (NCCL reduces CUDA tensors only)"""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order (on every process)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Sum ``.grad`` over processes (a missing grad counts as zeros, so every process calls the same ops)."""
        if self.size == 1:
            return
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)


SINGLE = World()


def current_world(device: torch.device = SINGLE.device) -> World:
    """This process's place among those ``accelerate launch`` started (rank 0 of 1 otherwise); ``device``
    is the process's own (:func:`minichatgpt.runtime.device.resolve` gives each its LOCAL_RANK's GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():  # env:// rendezvous that accelerate launch / torchrun set up
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of forward chunk ``chunk``: independent of which process generates it."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:chunk:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
