"""Real multi-process runs with gloo: spawn N ranks, return what each rank returned."""

import json
import os
import socket
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, outdir, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size, tmpdir, *args, timeout=120):
    """Run fn(rank, world_size, *args) on `world_size` spawned gloo ranks; list of results."""
    ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), str(tmpdir), args),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"ranks did not finish within {timeout}s")
    results = []
    for r in range(world_size):
        with open(os.path.join(tmpdir, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results
