"""torch.distributed helpers: who am I, wait for the others, agree on a number.

Conversion and fine-tuning run unchanged in one process; under ``torchrun`` (an initialised process
group) they split work by rank. Nothing here starts a group except :func:`init_from_env`, which the
CLI calls when ``torchrun`` has set ``WORLD_SIZE``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mpocompress.errors import (
    EXIT_GATE,
    EXIT_INPUT,
    EXIT_OUTPUT,
    EXIT_USAGE,
    ConfigError,
    GateError,
    InputError,
    MPOCompressError,
    OutputError,
)


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


#: the error a rank raises for another rank's failure, by that failure's exit code (same code
#: everywhere; anything else is an internal error)
_PEER_ERRORS: dict[int, type[MPOCompressError]] = {
    EXIT_USAGE: ConfigError, EXIT_INPUT: InputError, EXIT_OUTPUT: OutputError, EXIT_GATE: GateError,
}  # fmt: skip


@contextmanager
def together() -> Iterator[None]:
    """Run a step on every rank such that a failure on one stops all of them cleanly.

    Under ``torchrun`` a rank that fails would leave the others waiting at their next collective
    until the process group breaks, and they would die of a communication error reported as an
    internal error (exit 1) -- the real cause, say bad input on rank 1, named only in that rank's
    log. Here every rank's outcome is exchanged after the step: the failing rank raises its own
    error, every other rank an error with the same exit code naming the first failing rank and its
    message. In one process this is a plain ``yield``.
    """
    world = rank_world()[1]
    if world == 1:
        yield
        return
    import torch.distributed as dist

    error: Exception | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every rank must reach the exchange below
        error = e
    mine = None if error is None else [getattr(error, "exit_code", 1), (str(error).splitlines() or [type(error).__name__])[0]]
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    if error is not None:
        raise error
    failed = next(((r, f) for r, f in enumerate(every) if f is not None), None)
    if failed is not None:
        r, (code, message) = failed
        raise _PEER_ERRORS.get(code, MPOCompressError)(f"rank {r} of {world} stopped, so this rank did: {message}")
