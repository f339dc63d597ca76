"""Training on several processes with ``torchrun`` (PyTorch's distributed engine: gloo on the CPU,
NCCL on GPUs).

``torchrun --nproc_per_node N -m cvmkd_core run RECIPE`` starts N copies of cvmkd; each reads its
rank from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Rank 0 is the
run's only writer: it prepares the run directory, validates, checkpoints, logs, packages and
reports. The other ranks train in step with it and run only the plugins that declare
``cvmkd_all_ranks = True`` (the trainer, and the plugins that change the model it trains); they learn from rank 0
what each validation decided (keep going, roll back, stop) and load the same checkpoints.

A plain ``cvmkd run`` is a world of one: nothing here changes it.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from typing import Any

import attrs

log = logging.getLogger("cvmkd")

#: how long a rank waits for the others at a meeting point; rank 0 builds the caches and the
#: shared caches and validates while the others wait, which may take long on a first run
WAIT = datetime.timedelta(hours=int(os.environ.get("CVMKD_DIST_TIMEOUT_HOURS", "6")))


@attrs.frozen
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run's files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.size, "backend": self.backend}


SINGLE = World()
_current: World = SINGLE


def current_world() -> World:
    """The world this process belongs to: joined on first use when torchrun started it."""
    global _current
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or _current.size > 1:
        return _current
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("CVMKD_DIST_BACKEND", "") != "gloo"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=WAIT)
        atexit.register(_leave)
    _current = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, backend=backend)
    return _current


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank ``rank``'s own random draws (dropout) from ``step`` on; rank 0 keeps the
    recipe's, so that its draws are those of a single-process run."""
    return seed if rank == 0 else (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def keep_on_this_rank(plugin: Any) -> bool:
    """Whether ``plugin``'s hooks run on ranks other than 0."""
    return bool(getattr(plugin, "cvmkd_all_ranks", False))


def leave_to_main(pm: Any) -> list[str]:
    """On ranks other than 0: unregister every plugin that does not run on all ranks (loggers,
    reporters...), so that rank 0 alone writes. Returns their names."""
    removed = []
    for name, plugin in list(pm.list_name_plugin()):
        if plugin is not None and not keep_on_this_rank(plugin):
            pm.unregister(plugin)
            removed.append(name)
    return removed


__all__ = ["SINGLE", "World", "current_world", "keep_on_this_rank", "leave_to_main", "rank_seed"]
