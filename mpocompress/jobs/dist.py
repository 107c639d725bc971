"""torch.distributed helpers: who am I, wait for the others, agree on a number.

Conversion and fine-tuning run unchanged in one process; under ``torchrun`` (an initialised process
group) they split work by rank. Nothing here starts a group except :func:`init_from_env`, which the
CLI calls when ``torchrun`` has set ``WORLD_SIZE``.
"""

from __future__ import annotations

import os

import torch


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (nothing to do in one process)."""
    if rank_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def agreed(value: float, rank0: bool = True) -> float:
    """The same number on every rank: rank 0's (``rank0``), or the maximum over ranks."""
    if rank_world()[1] == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if rank0:
        dist.broadcast(t, src=0)
    else:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), on the gloo backend (CPU;
    ``MPOCOMPRESS_DIST_BACKEND`` picks another). Returns True when a group was started here."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group(backend=os.environ.get("MPOCOMPRESS_DIST_BACKEND", "gloo"))
    return True


def shutdown() -> None:
    """Leave the process group, if one is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shared_error(message: str | None) -> str | None:
    """Rank 0's error message (or None) on every rank, so all ranks stop together when rank 0
    cannot go on (a locked output, say) instead of waiting at the next barrier."""
    if rank_world()[1] == 1:
        return message
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]
