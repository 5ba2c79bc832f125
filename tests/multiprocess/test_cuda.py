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
        assert stop and step == 11


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
