"""Several processes, one run: PyTorch's own distributed engine under the one loop.

`torchrun` (and `accelerate launch`) start one process per device and set `RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; `finesmith train
--nproc-per-node N` starts `torchrun` for the user. Each process then:

- joins the process group (NCCL on CUDA, gloo on CPU) and uses `cuda:LOCAL_RANK` or the CPU;
- wraps the model in `DistributedDataParallel` (adapters, small models: a replica per rank,
  gradients averaged by DDP's bucketed all-reduce, overlapped with the backward pass), or
  shards it with FSDP2 `fully_shard` (full fine-tuning: each decoder block's weights,
  gradients and optimizer state split over the ranks, gathered block by block for the
  forward and backward passes). `parallelism: auto|ddp|fsdp` chooses; `auto` is FSDP2 for
  `method: full` and DDP otherwise;
- takes a disjoint, deterministic share of every step's examples: micro-batch `i` of the
  step holds the same examples whatever the world size, and rank `r` trains on examples
  `r, r + N, r + 2N, ...` of it. The data position is counted in these global micro-batches,
  so a checkpoint resumes on any number of processes;
- divides the loss by the step's supervised tokens summed over all ranks (one all-reduce per
  step), so N ranks × micro-batch b equals 1 rank × micro-batch N·b in loss and gradients.

Only rank 0 writes the run record, `metrics.jsonl`, samples and the final weights (under
FSDP2 the full weights are gathered to rank 0 once, at the end). Checkpoints go through
`torch.distributed.checkpoint` (see `checkpoint.py`): every rank writes its shard, and a
checkpoint loads on any number of processes and either parallelism. A stop signal on any rank is agreed on by all ranks
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


def parallelism(choice: str, method: str, world: World) -> str:
    """`none` for one process; otherwise the config's choice, `auto` being fsdp for full fine-tuning."""
    if not world.distributed:
        return "none"
    if choice == "auto":
        return "fsdp" if method == "full" else "ddp"
    return choice


def wrap(model: torch.nn.Module, device: torch.device, mode: str = "ddp", bf16: bool = False) -> torch.nn.Module:
    """What the loop runs forward and backward through.

    `ddp`: a DistributedDataParallel wrapper (the module itself stays what callers save and
    evaluate). `fsdp`: the module itself, sharded in place by FSDP2: every decoder block
    (the model's `_no_split_modules`) is one unit, the rest (embeddings, final norm, head,
    tied or not) the root unit. With `bf16` the gathered weights are bf16 and gradients are
    reduced in fp32, while the sharded masters and optimizer state stay fp32.
    """
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        options = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if bf16 else {}
        for module in shard_units(model):
            fully_shard(module, **options)
        fully_shard(model, **options)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP2 shards as units of their own under the root: the decoder blocks.

    They are the modules whose class the model names in `_no_split_modules` (e.g.
    `Qwen3MoeDecoderLayer`, `Gemma3DecoderLayer`), outermost only: a unit inside another unit
    would be gathered twice. A model that names none (or none of its modules match) falls back
    to its list of decoder blocks, so each block is still gathered alone, never the whole model.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or ())
    units: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # parents come before their children
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            units.append(module)
            inside.update(id(child) for child in module.modules())
    if units:
        return units
    from finesmith.errors import FinesmithError
    from finesmith.model.methods import transformer_blocks

    try:
        return list(transformer_blocks(inner))
    except FinesmithError:  # no list of blocks either: the root unit holds everything
        return []


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is (or contains) an FSDP2 unit: its parameters are DTensor shards."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, on: bool):
    """Within it, backward passes synchronise gradients across ranks only when `on` (the step's
    last micro-batch); the others accumulate locally (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`)."""
    if on:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a plain tensor as it is), e.g. the gradient norm over shards."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def gathered_weights(model: torch.nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on rank 0's CPU, `{}` on the other ranks. A collective under
    FSDP2: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    weights = get_model_state_dict(model, options=options)
    # A tied weight (an LM head sharing the embedding) appears under both names; keep the one
    # `named_parameters` keeps, as `save_pretrained` of an unsharded model does.
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in weights.items() if k in names}


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
    return float(_reduce(float(value), "SUM", torch.float64, device))


def max_all(value: int, device: torch.device) -> int:
    """The largest `value` over every rank (itself outside a process group)."""
    return int(_reduce(int(value), "MAX", torch.int64, device))


def _reduce(value: float | int, op: str, dtype: torch.dtype, device: torch.device) -> float | int:
    if not current().distributed:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=dtype, device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.item()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a stop signal)."""
    return sum_all(1 if flag else 0, device) > 0


def barrier() -> None:
    world = current()
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()
