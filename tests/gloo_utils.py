"""Real multi-process groups without Ray: `world` spawned processes joined by gloo on 127.0.0.1."""

from __future__ import annotations

import os


def join_gloo(rank: int, world: int, port: int) -> None:
    """In a spawned worker: the env DeepSpeed reads (CPU accelerator, ranks), one thread per process
    (2 cores), then the gloo process group."""
    import torch
    import torch.distributed as dist

    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def spawn(worker, world: int, *args) -> None:
    """worker(rank, world, port, *args) in `world` spawned processes; raises if any fails."""
    import torch.multiprocessing as mp
    from conftest import free_port

    mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world, start_method="spawn")
