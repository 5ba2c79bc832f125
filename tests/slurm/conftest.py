import pytest

from slurm_cluster import Cluster, missing


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    absent = missing()
    if absent:
        pytest.skip(f"SLURM is not installed here (missing {', '.join(absent)}); "
                    "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)")
    c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()
