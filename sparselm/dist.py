"""Several processes (``torchrun --nproc-per-node N sparselm compress ...``) through ``torch.distributed``.

The ranks split the calibration batches (rank ``r`` runs batches ``r, r+N, r+2N, ...``) and each block's layer
sets (set ``j`` is compressed by rank ``j mod N`` and sent to the others); rank 0 alone writes. The statistics
of every batch are merged in the batch order of a single process (`merge_step`), so the Gram matrices, hence
every compressed tensor, are those of a one-process run bit for bit. One process (no torchrun) is rank 0 of 1
and none of this costs anything.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as td

from . import device as devices
from .capture import LinearStats
from .errors import InputError

log = logging.getLogger(__name__)


def active() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if active() else 0


def size() -> int:
    return td.get_world_size() if active() else 1


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment); the device this rank
    computes on (a GPU per rank: ``cuda:LOCAL_RANK``). Without torchrun: nothing, ``device`` as given."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return device
    device = devices.for_rank(device, int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group(backend=devices.dist_backend(device), device_id=device if device.type != "cpu" else None)
    log.info("rank %d of %d on %s", rank(), size(), device)
    return device


def check_batches(batches: int) -> None:
    if batches < size():
        raise InputError(f"{batches} calibration batches for {size()} processes: every process needs one",
                         f"raise --nsamples to at least {size()} x the batch size, or start fewer processes")


def mine(batches: int) -> list[int]:
    """This rank's calibration batches."""
    return list(range(rank(), batches, size()))


def steps(batches: int) -> int:
    """Rounds of one batch per rank that cover all batches."""
    return -(-batches // size())


def merge_step(stats: dict[str, LinearStats], pending: dict[str, LinearStats], names: list[str], step: int,
               batches: int) -> None:
    """Add round ``step``'s statistics of every rank to ``stats`` in global batch order (batch ``step*N + r``
    of rank ``r``), exactly as one process adds batch after batch. ``pending``: this rank's statistics of its
    batch of this round (empty when it has none); ``names``: the recorded layers, in a fixed order. Layers
    that share one statistics object (q/k/v reading one input) are merged once and keep sharing it."""
    if names[0] not in stats:  # the first round: every rank has a batch; the sharing is taken from it
        for name in names:
            first = next(n for n in names if pending[n] is pending[name])
            stats[name] = stats[first] if first != name else LinearStats.empty(pending[name].in_features,
                                                                                pending[name].gram.device)
    ranks = [r for r in range(size()) if step * size() + r < batches]
    done: set[int] = set()
    for name in names:
        target = stats[name]
        if id(target) in done:
            continue
        done.add(id(target))
        own = pending.get(name)
        gram = own.gram if own is not None else torch.zeros_like(target.gram)
        count = torch.tensor([own.count if own is not None else 0], dtype=torch.float64, device=gram.device)
        grams, counts = [torch.empty_like(gram) for _ in range(size())], [torch.empty_like(count)
                                                                          for _ in range(size())]
        td.all_gather(grams, gram)
        td.all_gather(counts, count)
        for r in ranks:
            target.gram += grams[r]
            target.count += int(counts[r].item())


def broadcast(obj: Any, src: int) -> Any:
    """``obj`` of rank ``src`` on every rank (plain data and CPU tensors, between this run's own processes)."""
    box = [obj if rank() == src else None]
    td.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        td.barrier()
