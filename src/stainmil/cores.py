"""How many CPU cores this process may use: one answer for every pool of workers."""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on: its affinity (the SLURM allocation / cgroup, not the machine's count) where
    the platform has one (Linux), else the machine's count (macOS, Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
