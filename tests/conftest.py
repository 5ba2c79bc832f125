import os
import sys

# Spawned ranks import helpers and test modules by name: make the tests folder importable.
sys.path.insert(0, os.path.dirname(__file__))
# The reference recipe's building blocks (recipes/finetune_parts) are the recipe's, not the library's.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
# No test may send traffic beyond 127.0.0.1: the AWS SDK never asks the instance metadata address.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

import pytest  # noqa: E402

REFERENCE_STEPS = 40


class _References:
    """Uninterrupted recipe runs, the yardstick the e2e and fault tests compare against: `[nproc]`
    is a run directory of REFERENCE_STEPS steps with checkpoints every 10 (all kept), made on first
    use and shared by the whole session (saves do not change the training, so one serves all)."""

    def __init__(self, factory):
        self.factory, self.runs = factory, {}

    def __getitem__(self, nproc):
        if nproc not in self.runs:
            from recipe_helpers import run

            run_dir = self.factory.mktemp(f"reference{nproc}")
            code, log = run(run_dir, f"trainer.max_steps={REFERENCE_STEPS}", "checkpoint.interval=10",
                            "checkpoint.keep=4", nproc=nproc)
            assert code == 0, log
            self.runs[nproc] = run_dir
        return self.runs[nproc]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    return _References(tmp_path_factory)


# Tiers by folder: everything past unit/ and multiprocess/ starts recipes, examples, torchrun, SLURM
# or an S3 server, and is `slow` (`pytest -m "not slow"` is the fast tier).
SLOW_FOLDERS = ("e2e", "faults", "s3", "slurm")


# .ci/run runs the suite on two pytest-xdist workers, a file to a worker (`-n 2 --dist loadfile`): the
# SLURM tests share one cluster on fixed ports, so their one file must stay on one worker. Files start
# in this order: the slowest folders first (SLURM's clock, torchrun, recipes), the quick ones fill in.
FIRST = ("slurm", "e2e", "faults", "s3", "multiprocess")


def _folder(item) -> str:
    parts = item.path.parts
    return parts[parts.index("tests") + 1] if "tests" in parts else ""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _folder(item) in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(_folder(item), len(FIRST)))  # stable: files keep their order within
