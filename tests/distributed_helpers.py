"""Real multi-process runs with gloo: spawn N ranks, return what each rank returned."""

import json
import os
import socket
import sys
import time
import traceback

import torch.distributed as dist


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


def start_ranks(fn, world_size, tmpdir, *args, stdout=None):
    """Start fn(rank, world_size, *args) on `world_size` gloo ranks, each forked from the tests'
    pre-imported zygote (a spawned interpreter would pay seconds of imports per rank); a list of
    Popen-like processes (tests/zygote.py), each writing to this process's stdout and stderr."""
    from zygote import Forked

    port = free_port()
    return [Forked([sys.argv[0], f"rank{r}"], dict(os.environ), os.getcwd(), new_session=False, stdout=stdout,
                   call=(_entry, (r, fn, world_size, port, str(tmpdir), args))) for r in range(world_size)]


def run_ranks(fn, world_size, tmpdir, *args, timeout=120):
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; list of results."""
    procs = start_ranks(fn, world_size, tmpdir, *args)
    deadline = time.monotonic() + timeout
    try:
        for r, p in enumerate(procs):
            try:
                code = p.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                raise TimeoutError(f"ranks did not finish within {timeout}s") from None
            if code != 0:
                raise AssertionError(f"rank {r} exited with status {code} (its traceback is in the output above)")
    finally:
        for p in procs:
            p.kill()
    results = []
    for r in range(world_size):
        with open(os.path.join(tmpdir, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results
