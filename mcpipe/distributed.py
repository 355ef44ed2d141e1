"""Several processes under ``torchrun``: who this process is, joining the process group, agreeing.

Shared by ``extract`` (ranks write shards) and ``finetune`` (DistributedDataParallel);
a single process (no ``torchrun``) needs none of it and joins nothing.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (a single process when absent)."""
        return cls(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU) if running under torchrun."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # nccl's collectives, barriers included, run on the current device: this rank's
        torch.cuda.set_device(device)
    # extraction of a large split takes hours; ranks wait for the slowest at the barrier
    timeout = datetime.timedelta(hours=12)
    store = _attempt_store(info, timeout)
    if store is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=info.rank,
                                world_size=info.world_size)
    log.info("rank %d of %d joined the %s process group", info.rank, info.world_size, backend)


def _attempt_store(info: DistInfo, timeout: datetime.timedelta) -> dist.Store | None:
    """The rendezvous store for this attempt of a torchrun job, or None for torch's default (``env://``).

    torchrun's agent hosts one TCPStore for the whole job and shares it with its workers
    (``TORCHELASTIC_USE_AGENT_STORE``). After a restart (``--max-restarts``, e.g. one rank killed by the
    out-of-memory killer) the new workers would meet the keys the previous attempt left there -- the
    process-group barrier's counters and the dead ranks' addresses -- and wait on them until the timeout.
    A prefix per attempt (``TORCHELASTIC_RESTART_COUNT``) gives every attempt fresh keys.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"mcpipe-attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def sum_over_ranks(info: DistInfo, values: list[int], device: torch.device) -> list[int]:
    """``values`` summed over every rank (a barrier too); ``values`` itself in a single process."""
    if not (info.enabled and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
