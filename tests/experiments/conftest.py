import os
import tempfile
from pathlib import Path

import pytest

from tests.experiments.slurm_cluster import SlurmCluster


@pytest.fixture(scope="session")
def slurm():
    """One real SLURM per test session (`make test` runs the slurm tests in one process of their own)."""
    # a short path: the munge socket must stay under the unix socket path length limit
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))).start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    cluster.stop()
