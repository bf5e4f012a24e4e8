"""Install real system components for tests (Debian packages), once per machine, under a file lock.

CI runs as root on Debian: the packages are installed there. Elsewhere (no root, no apt-get) the
tests that need them are skipped with the reason.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

LOCK = Path("/tmp/stainmil-apt.lock")


def ensure_debian_packages(binary: str, packages: list[str]) -> str:
    """Path of ``binary``; installs ``packages`` with apt-get first if it is missing."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{binary} is not installed and cannot be (needs root and apt-get: apt-get install {packages})")
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # xdist workers wait for each other
        if not shutil.which(binary):
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            # an install killed half-way (a test run stopped with Ctrl-C) leaves dpkg "interrupted": finish it first
            subprocess.run(["dpkg", "--configure", "-a"], env=env, capture_output=True)
            subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
            result = subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, capture_output=True,
                                    text=True)
            if result.returncode != 0:
                pytest.fail(f"apt-get install {packages} failed: {result.stderr[-800:]}")
    found = shutil.which(binary)
    assert found, f"{binary} still missing after installing {packages}"
    return found
