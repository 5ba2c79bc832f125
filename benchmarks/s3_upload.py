"""Checkpoints on S3: our upload of a stop's checkpoint vs a plain upload of the same bytes, and
what a periodic save costs the loop with the remote tier.

    python benchmarks/s3_upload.py [--n-layer 4 --n-embd 384] [--repeats 7]

An S3 server (moto's, in a process of its own) on 127.0.0.1. One committed checkpoint of the
recipe's GPT with AdamW state is written locally, then, in each round in a fresh random order:
  preemptible upload  `Remote.upload`: every data object, sizes listed and checked, the marker
                      object, then `latest` (what a stop waits for after its local commit);
  s3fs put            the same files with fsspec/s3fs `put` (the same client, nothing else);
  boto3 upload_file   the same files with boto3's managed transfer, one after another.
Printed: median seconds, and the ratio of ours to the faster plain upload (target <= 1.2).

Then the loop's view (a fresh Checkpointer on s3:// each time): a synchronous save (local commit
+ upload, what a stop costs) vs an async periodic save's blocked time (the call, plus the wait
for the staging copy before the next optimizer step; the write, commit and upload continue in the
background): target <= 0.10 of the synchronous save.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # the recipe's building blocks
from preemptible.checkpoint.writer import Checkpointer
from finetune_parts.model import GPT
from preemptible.checkpoint.remote import Remote
from preemptible.run.state import ModelOptimState


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    client = boto3.client("s3")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="bench")
            break
        except Exception:  # noqa: BLE001 -- the server is still starting
            time.sleep(0.1)
    root = Path(tempfile.mkdtemp(prefix="s3-bench-", dir=os.getcwd()))
    try:
        torch.manual_seed(0)
        model = GPT(block_size=256, n_layer=args.n_layer, n_head=max(1, args.n_embd // 64), n_embd=args.n_embd)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = torch.randint(0, 256, (4, 256))

        def train_step() -> None:
            model(batch, batch).backward()

        train_step()
        optimizer.step()
        state = {"model_optim": ModelOptimState(model, optimizer), "progress": {"step": 1}}
        local = Checkpointer(dir=str(root / "local"), interval=1, keep=1).setup(str(root), 0)
        ckpt = local.save(1, state)
        files = sorted(p for p in ckpt.iterdir() if p.is_file())
        nbytes = sum(p.stat().st_size for p in files)

        def ours(r: int) -> None:
            Remote(f"s3://bench/ours{r}").upload(ckpt)

        def s3fs_put(r: int) -> None:
            remote = Remote(f"s3://bench/s3fs{r}")
            remote.fs.put([str(p) for p in files], [remote.key(ckpt.name, p.name) for p in files])

        def boto3_upload(r: int) -> None:
            for p in files:
                client.upload_file(str(p), "bench", f"boto{r}/{ckpt.name}/{p.name}")

        def sync_save(r: int) -> None:
            cp = Checkpointer(dir=f"s3://bench/sync{r}", local_dir=str(root / f"sync{r}"), interval=1, keep=1)
            cp.setup(str(root), 0)
            cp.save(1, state)
            cp.wait_upload()
            cp.close()

        blocked_times: list[float] = []

        def async_blocked(r: int) -> None:
            cp = Checkpointer(dir=f"s3://bench/async{r}", local_dir=str(root / f"async{r}"), interval=1, keep=1,
                              async_save=True)
            cp.setup(str(root), 0)
            t0 = time.perf_counter()
            cp.save(1, state, wait=False)
            blocked = time.perf_counter() - t0
            train_step()  # the next forward/backward overlaps the staging copy
            t1 = time.perf_counter()
            cp.wait_staged()  # what the loop waits for before optimizer.step()
            blocked_times.append(blocked + time.perf_counter() - t1)
            cp.close()  # written, committed and uploaded (not counted: background work)

        runs = {"preemptible upload": ours, "s3fs put": s3fs_put, "boto3 upload_file": boto3_upload,
                "sync save + upload": sync_save, "async save (total)": async_blocked}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(args.repeats):
            for name in random.sample(list(runs), len(runs)):
                t0 = time.perf_counter()
                runs[name](r)
                times[name].append(time.perf_counter() - t0)
            for prefix in [o["Prefix"] for o in client.list_objects_v2(Bucket="bench", Delimiter="/").get(
                    "CommonPrefixes", [])]:
                Remote(f"s3://bench/{prefix}").fs.rm(f"bench/{prefix}", recursive=True)
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    blocked = statistics.median(blocked_times)
    plain = min(med["s3fs put"], med["boto3 upload_file"])
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; checkpoint {nbytes / 1e6:.1f} MB in {len(files)} files; "
          f"{args.repeats} rounds, median seconds; S3: moto server on 127.0.0.1")
    for name in ("preemptible upload", "s3fs put", "boto3 upload_file"):
        print(f"  {name:22s} {med[name]:7.3f} s  {nbytes / 1e6 / med[name]:7.1f} MB/s")
    print(f"  ratio ours / faster plain upload = {med['preemptible upload'] / plain:.3f} (target <= 1.2)")
    print(f"  sync save + upload     {med['sync save + upload']:7.3f} s   (a stop: local commit, then the upload)")
    print(f"  async save, blocked    {blocked:7.3f} s   = {blocked / med['sync save + upload']:.3f} of the synchronous "
          f"save + upload (target <= 0.10)")


if __name__ == "__main__":
    main()
