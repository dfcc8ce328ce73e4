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


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if world_size() == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def broadcast(obj, src: int = 0):
    if world_size() == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=src)[0]


class Sharded:
    """Wraps a backend so each rank generates a share of the requests and every rank gets
    all the outputs, in request order.

    In-process (``hf``) models split the requests round-robin over the ranks. A remote or
    vLLM backend is asked once, by rank 0 (its cache is one file), and the answers are
    broadcast. Greedy outputs do not depend on the number of processes; ``hf`` sampling
    seeds each rank's batch, so sampled outputs do."""

    def __init__(self, inner):
        self.inner = inner
        self.name = getattr(inner, "name", "hf")

    def __getattr__(self, attr):  # model, processor, ... of the wrapped backend
        return getattr(self.inner, attr)

    def generate(self, requests, **kwargs) -> list[str]:
        n = world_size()
        if n == 1:
            return self.inner.generate(requests, **kwargs)
        if self.name != "hf":
            out = self.inner.generate(requests, **kwargs) if is_main() else None
            return broadcast(out)
        mine = list(range(rank(), len(requests), n))
        texts = self.inner.generate([requests[i] for i in mine], **kwargs) if mine else []
        outputs: list[str] = [""] * len(requests)
        for i, t in gather(list(zip(mine, texts))):
            outputs[i] = t
        return outputs


def main_first(fn):
    """Call ``fn`` on rank 0, then (after a barrier) on the other ranks: for steps that
    write a shared cache the others then only read. Every rank must call it."""
    if world_size() == 1:
        return fn()
    if is_main():
        out = fn()
        barrier()
        return out
    barrier()
    return fn()
