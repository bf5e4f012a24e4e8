"""One writer per folder: an advisory lock that every command writing a folder takes first.

The lock is the kernel's ``flock`` on ``<folder>/.stainmil.lock`` (the file also records the holder: command,
host, PID and start time). The kernel releases it when the holder exits however it exits — ``kill -9``, a node's
OOM killer, a SLURM time limit — so a lock file left behind by a dead process is simply taken over (and the log
says whose it was). Only a lock held by a live process stops a second writer, with one sentence naming the holder
and how to clear the lock if the holder is on a machine that is gone.

Parts of one job that write disjoint files (the shards of an extraction) share the folder lock and each takes
an exclusive lock of its own part (``<folder>/.stainmil.<part>.lock``): shards run in parallel, the same shard
twice does not, and a whole-folder writer waits for none of them — it is refused while any shard runs.

flock works on local disks and on NFS (Linux emulates it with POSIX locks there); a network file system
without locking makes this a no-op, as it does for every tool.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stainmil.errors import StainmilError, output_error

LOCK_NAME = ".stainmil.lock"


class FolderBusy(StainmilError):
    """Another live process holds the folder's lock."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another stainmil process (the parts of one job, each in its own .stainmil.<part>.lock)"
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder.get("started", 0)))
    return (f"`stainmil {holder.get('command', '?')}` (PID {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {started})")


def _take(path: Path, exclusive: bool, command: str, log) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:  # the first write into an output folder: a read-only or full one is said here
        found = output_error(exc, path.parent)
        if found is None:
            raise
        raise found from exc
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(path)
        os.close(fd)
        raise FolderBusy(f"{path.parent} is being written by {_describe(holder)}; wait for it to finish — or, if "
                         f"that process is gone (a machine that went down), delete {path} and run this again.") \
            from None
    if exclusive:
        left = _holder(path)
        if left and log is not None:
            log(f"note: {path.parent} was last locked by {_describe(left)}, which ended without releasing it "
                "(killed?); taken over — what it wrote is checked as the command resumes.")
        record = {"command": command, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def _release(fd: int, exclusive: bool) -> None:
    if exclusive:
        os.ftruncate(fd, 0)  # a clean release leaves no holder behind (a crash leaves one: reported, taken over)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


_HELD: dict[tuple[str, str | None], int] = {}  # this process's locks (folder, part) -> depth: nested calls pass


@contextmanager
def folder_lock(folder: str | Path, command: str, part: str | None = None, log=print) -> Iterator[None]:
    """Hold ``folder``'s writer lock for ``command`` (one sentence, :class:`FolderBusy`, when a live process holds
    it). ``part``: a disjoint part of a job (an extraction shard) — the folder lock is shared, the part's is not.
    Re-entrant within a process (a command calling another library step on the same folder)."""
    folder = Path(folder).resolve()
    key = (str(folder), part)
    if _HELD.get(key) or _HELD.get((str(folder), None)):
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    whole = folder / LOCK_NAME
    fd = _take(whole, part is None, command, log)
    part_fd = None
    try:
        if part is not None:
            part_fd = _take(folder / f".stainmil.{part}.lock", True, command, log)
        _HELD[key] = 1
        yield
    finally:
        _HELD.pop(key, None)
        if part_fd is not None:
            _release(part_fd, True)
        _release(fd, part is None)
