"""On NCCL the default stop check must not synchronise the host with the device.

Runs only where CUDA exists (CI here has none); the device tool runs it on a GPU machine.
"""

import os

import pytest
import torch
import torch.distributed as dist

from distributed_helpers import free_port
from preemptible import DistributedSignalHandler, get_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def nccl_world():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    yield
    dist.destroy_process_group()


def test_default_check_never_syncs_with_the_gpu(nccl_world):
    model = torch.nn.Linear(256, 256).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with DistributedSignalHandler("SIGUSR2", group="cpu", local_rank=0) as handler:
        assert get_device(group=handler.group) == torch.device("cpu")  # a gloo side group
        assert dist.get_backend() == "nccl"
        for step in range(20):
            loss = model(torch.randn(64, 256, device="cuda")).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            torch.cuda.set_sync_debug_mode("error")
            try:
                stop = handler.should_stop()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if step == 10:
                os.kill(os.getpid(), 12)  # SIGUSR2
            if stop:
                break
        assert stop and step == 12  # pipelined: the reduction that carries it starts at 11, is read at 12


def test_nccl_device_follows_the_group(nccl_world):
    assert get_device(0) == torch.device("cuda:0")
    side = dist.new_group(backend="gloo")
    assert get_device(0, group=side) == torch.device("cpu")


def test_fsdp_recipe_on_one_gpu_smoke(tmp_path):
    """World size 1 with NCCL: FSDP2, a sharded save, a resume."""
    from recipe_helpers import events, run
    code, log = run(tmp_path, "trainer.parallelism=fsdp", "trainer.max_steps=20", "checkpoint.interval=10",
                    "trainer.device=cuda", nproc=1, launcher=True)
    assert code == 0, log
    code, log = run(tmp_path, "trainer.parallelism=fsdp", "trainer.max_steps=30", "trainer.device=cuda",
                    nproc=1, launcher=True)
    assert code == 0 and events(tmp_path, "resumed")[0]["step"] == 20, log


def test_amp_example_on_a_gpu_stops_during_eval_and_resumes_bit_identically(tmp_path):
    """examples/accumulate_amp_eval.py on CUDA: float16 autocast with a real GradScaler; TERM lands
    during an evaluation; the same command again ends with the uninterrupted run's parameters."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from recipe_helpers import events, wait_for_step

    repo = Path(__file__).resolve().parents[2]
    common = ["--steps", "30", "--eval-every", "10", "--log-every", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def start(run_dir, *extra):
        return subprocess.Popen([sys.executable, str(repo / "examples" / "accumulate_amp_eval.py"), str(run_dir),
                                 *common, *extra], cwd=repo, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    ref = start(tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    proc = start(tmp_path / "run", "--eval-seconds", "1")
    wait_for_step(tmp_path / "run", 10, proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, proc.stdout.read()
    stop = events(tmp_path / "run", "preempted")[0]
    assert stop["step"] == 10 and stop["mid_step"] is True
    again = start(tmp_path / "run")
    assert again.wait(timeout=300) == 0, again.stdout.read()
    assert events(tmp_path / "run", "done")[0]["params_sha256"] == events(tmp_path / "ref", "done")[0]["params_sha256"]
    scales = [r["scale"] for r in (__import__("recipe_helpers").rows(tmp_path / "run")) if "scale" in r]
    assert scales and all(s > 0 for s in scales)  # a real dynamic loss scale on the GPU
