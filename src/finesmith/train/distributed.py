"""Several processes, one run: PyTorch's own distributed engine under the one loop.

`torchrun` (and `accelerate launch`) start one process per device and set `RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; `finesmith train
--nproc-per-node N` starts `torchrun` for the user. Each process then:

- joins the process group (NCCL on CUDA, gloo on CPU) and uses `cuda:LOCAL_RANK` or the CPU;
- wraps the model in `DistributedDataParallel` (the gradients are averaged by DDP's own
  bucketed all-reduce, overlapped with the backward pass);
- takes a disjoint, deterministic share of every step's examples: micro-batch `i` of the
  step holds the same examples whatever the world size, and rank `r` trains on examples
  `r, r + N, r + 2N, ...` of it. The data position is counted in these global micro-batches,
  so a checkpoint resumes on any number of processes;
- divides the loss by the step's supervised tokens summed over all ranks (one all-reduce per
  step), so N ranks × micro-batch b equals 1 rank × micro-batch N·b in loss and gradients.

Only rank 0 writes: the run record, `metrics.jsonl`, checkpoints, samples and the final
weights (the replicas are identical). A stop signal on any rank is agreed on by all ranks
at the end of the step, so every rank stops after the same step, with one checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank, the number of processes, its local device index."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def world_from_env() -> World:
    """The launcher's view of this process (a single process when none is set)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def current() -> World:
    """This process's place in the running process group (SINGLE outside one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return SINGLE


def init(world: World) -> torch.device:
    """Join the process group of `world` (if not joined yet) and return this rank's device."""
    import torch.distributed as dist

    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size)
    return device


def finish() -> None:
    """Leave the process group (every rank, at the end of the run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` under DistributedDataParallel (the module itself stays what callers save and evaluate)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class NoLog:
    """What ranks other than 0 log to: nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def one_at_a_time(name: str):
    """Ranks of one machine enter one after another (a file lock, no process group needed):
    the first tokenizes and fills the data cache, the others then read it, and no rank waits
    inside a collective call, so none times out however long tokenizing takes."""
    from finesmith.core.paths import cache_root

    world = world_from_env()
    if not world.distributed:
        yield
        return
    folder = cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def shard(examples: list, world: World) -> list:
    """This rank's share of one global micro-batch: examples rank, rank + N, ..."""
    return examples[world.rank::world.size]


def sum_all(value: float | int, device: torch.device) -> float:
    """`value` summed over every rank (itself outside a process group)."""
    world = current()
    if not world.distributed:
        return float(value)
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a stop signal)."""
    return sum_all(1 if flag else 0, device) > 0


def barrier() -> None:
    world = current()
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()
