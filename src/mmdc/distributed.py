"""Several processes (``torchrun`` / ``accelerate launch``): who writes, who waits.

Training stages run data-parallel through the HF Trainer (DDP, FSDP or DeepSpeed, as the
accelerate config says). Everything that writes to the run folder runs on rank 0 only;
the other ranks wait at a barrier, so a run folder is the same whatever the number of
processes. ``train.batch_size`` is the global batch: each of N processes takes 1/N of it.
"""

from __future__ import annotations

import os

from mmdc.errors import ConfigError


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group when launched as several processes (gloo on CPU)."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def per_device_batch(global_batch: int, key: str = "train.batch_size") -> int:
    n = world_size()
    if global_batch % n:
        raise ConfigError(f"key '{key}': the global batch {global_batch} does not split "
                          f"evenly over {n} processes")
    return global_batch // n
