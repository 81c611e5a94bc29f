"""Data-parallel runs over torch.distributed, as torchrun launches them.

    torchrun --nproc-per-node 8 -m xcli train acts.zarr -o xc.safetensors ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; `process_group`
joins the group (NCCL for CUDA, gloo for CPU) and yields a `Comm`. Outside torchrun the
same code runs with `Comm()`, whose collectives are the identity, so the training
loop has one path for one process and for many. `xc train --split-sources` uses the
same Comm to split one crosscoder's sources over the ranks instead
(xcli.crosscoder.source_parallel). `agree` and `together` stop every rank alike when one
fails; which rank speaks for all is xcli.ranks.
"""

import os
import time
from contextlib import contextmanager
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from xcli.errors import BadInput, XcError
from xcli.ranks import ReportedByRankZero, launched  # noqa: F401 (launched: read here by callers)


class Comm:
    """The collectives a data-parallel training step needs; identities in a single process."""

    def __init__(self):
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, evaluates and writes files."""
        return self.rank == 0

    def sum(self, t: Tensor) -> Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def sum_(self, t: Tensor) -> Tensor:
        """sum, in place (no copy of a large tensor)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def min(self, t: Tensor) -> Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        if self.world == 1:
            return bool(flag)
        return bool(self.sum(torch.tensor([float(flag)], device=device)) > 0)

    def cat(self, t: Tensor) -> Tensor:
        """The 1-D tensors of all ranks (of any lengths), concatenated in rank order."""
        if self.world == 1:
            return t
        sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([t.numel()], device=t.device))
        longest = int(max(sizes))
        padded = torch.cat([t, t.new_zeros(longest - t.numel())])
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:int(n)] for p, n in zip(parts, sizes)])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum_gradient(self, t: Tensor) -> Tensor:
        """t itself, but its gradient is summed over the ranks (model parallel: each rank
        holds a part of the loss that depends on t; xcli.crosscoder.source_parallel)."""
        return _SumGradient.apply(t, self) if self.world > 1 else t


class _SumGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, comm: Comm) -> Tensor:
        ctx.comm = comm
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.comm.sum(grad.contiguous()), None


SINGLE = Comm.__new__(Comm)
SINGLE.active, SINGLE.rank, SINGLE.world = False, 0, 1


# -- failing together -------------------------------------------------------------------------------


def agree(comm: Comm, error: XcError | None) -> None:
    """Collective: if any rank failed, every rank raises (rank 0 the first failure, the others quietly)."""
    if comm.world == 1:
        if error is not None:
            raise error
        return
    failures = [None] * comm.world
    dist.all_gather_object(failures, None if error is None else (error.exit_code, str(error)))
    first = next((f for f in failures if f is not None), None)
    if first is None:
        return
    code, message = first
    if not comm.main:
        raise ReportedByRankZero(message, code)
    if error is not None:
        raise error
    raise (BadInput if code == BadInput.exit_code else XcError)(message)


def together(comm: Comm, action: Callable | None, catching: type[XcError] = XcError):
    """Run `action` (None: nothing to do on this rank), then stop every rank if it failed on any."""
    result, error = None, None
    try:
        if action is not None:
            result = action()
    except catching as e:
        error = e
    agree(comm, error)
    return result


@contextmanager
def process_group(device: torch.device):
    """Join torchrun's process group for the length of a run (a Comm of one process otherwise)."""
    if not launched():
        yield SINGLE
        return
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Comm()
    finally:
        # Give gloo's worker threads time to drop their references to the last collective's
        # tensors: dropped while the interpreter exits, they abort the process (seen in about
        # 1 of 12 two-rank runs; none in 55 with the pause).
        time.sleep(0.05)
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK for CUDA runs under torchrun, unless a GPU was named."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
