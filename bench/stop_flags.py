"""What finetune's per-step agreement under torchrun costs: ``on_every_rank`` (an all-reduce of the
[stop requested, checkpoint due] flags) on every rank, timed over many steps.

    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 bench/stop_flags.py [--steps N]

On CPU ranks (gloo) it prints the microseconds per step; on GPUs (nccl) the same, each all-reduce waiting
for the device.
"""

from __future__ import annotations

import argparse
import time

import torch

from mcpipe.devices import resolve_device
from mcpipe.distributed import DistInfo, init, shutdown
from mcpipe.finetune.train import on_every_rank


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    info = DistInfo.from_env()
    device = resolve_device(args.device, key="--device", local_rank=info.local_rank)
    init(info, device)
    try:
        for _ in range(200):  # warm-up
            on_every_rank([False, False], info, device)
        start = time.perf_counter()
        for _ in range(args.steps):
            on_every_rank([False, False], info, device)
        per = (time.perf_counter() - start) / args.steps
        if info.is_main:
            backend = torch.distributed.get_backend() if info.enabled else "none (one process)"
            print(f"on_every_rank over {info.world_size} rank(s), {backend}: {per * 1e6:.0f} us per step "
                  f"({args.steps} steps)")
    finally:
        shutdown(info)


if __name__ == "__main__":
    main()
