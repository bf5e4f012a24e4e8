"""Run many jobs locally or on SLURM through submitit (no hand-rolled sbatch polling).

A job is a picklable callable plus its arguments. How they run is one :class:`Launch` value, which every
experiment function takes as ``launch=``: ``local`` runs them one after another in this process (simple,
debuggable) or in ``workers`` processes; ``slurm`` submits them as one array job with the ``slurm.*`` settings.
Callables that define ``checkpoint(*args)`` are requeued by submitit when SLURM preempts them or
their time limit is near, and resume from their own checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stainmil.config import SlurmConfig
from stainmil.cores import available_cores
from stainmil.errors import ConfigError
from stainmil.stopping import job, stop_cleanly_on_sigterm


@dataclass(frozen=True)
class Launch:
    """How an experiment's jobs run: ``launcher`` local or slurm, ``workers`` jobs at once on this machine (local),
    ``log`` where the progress lines go."""

    launcher: str = "local"
    workers: int = 1
    log: Callable[[str], Any] = print

    def __post_init__(self) -> None:
        if self.launcher not in ("local", "slurm"):
            raise ConfigError(f"--launcher must be local or slurm, got '{self.launcher}'.")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"--workers must be a whole number of at least 1, got {self.workers!r}.")


def slurm_parameters(slurm: SlurmConfig, name: str) -> dict[str, Any]:
    """submitit ``update_parameters`` for ``slurm`` (pure function)."""
    params: dict[str, Any] = {
        "name": name, "timeout_min": slurm.time, "mem_gb": slurm.mem, "cpus_per_task": slurm.cpus,
        "slurm_array_parallelism": slurm.array_parallelism,
    }
    if slurm.partition:
        params["slurm_partition"] = slurm.partition
    if slurm.gpus:
        params["gpus_per_node"] = slurm.gpus
    if slurm.account:
        params["slurm_account"] = slurm.account
    if slurm.setup:
        params["slurm_setup"] = list(slurm.setup)
    extra = {}
    for line in slurm.extra:
        key, _, value = line.lstrip("-").partition("=")
        extra[key] = value or None
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def slurm_executor(folder: Path, slurm: SlurmConfig, name: str):
    """A submitit executor for this cluster with the ``slurm.*`` settings (logs in <folder>/slurm_logs)."""
    import submitit

    executor = submitit.AutoExecutor(folder=Path(folder) / "slurm_logs" / "%j",
                                     slurm_max_num_timeout=slurm.max_requeues)
    if executor.cluster != "slurm":
        raise ConfigError("--launcher slurm but no SLURM cluster is reachable from here (sbatch not found); run on "
                          "a login node or use --launcher local.")
    executor.update_parameters(**slurm_parameters(slurm, name))
    return executor


def run_jobs(fn: Callable, arg_lists: Sequence[Sequence[Any]], launch: Launch, folder: Path, slurm: SlurmConfig,
             name: str = "stainmil") -> list[Any]:
    """Run ``fn(*args)`` for every entry of ``arg_lists`` as ``launch`` says; return the results in order.

    ``local`` with ``workers > 1``: that many fresh processes on this machine (the cores shared out between
    them); each loads its own cohort, so set ``features.cache_mb`` to bound each one's memory — the store's
    files are then shared through the OS page cache rather than copied into every process.
    """
    log = launch.log
    if launch.launcher == "local":
        if launch.workers > 1 and len(arg_lists) > 1:
            return _run_processes(fn, arg_lists, min(launch.workers, len(arg_lists)), log)
        return [fn(*args) for args in arg_lists]
    executor = slurm_executor(folder, slurm, name)
    columns = list(zip(*arg_lists)) if arg_lists else []
    jobs = executor.map_array(fn, *columns)
    log(f"submitted {len(jobs)} SLURM job(s): {', '.join(j.job_id for j in jobs[:8])}"
        + (" …" if len(jobs) > 8 else "") + f"; logs in {Path(folder) / 'slurm_logs'}")
    return [job.result() for job in jobs]


def _run_processes(fn: Callable, arg_lists: Sequence[Sequence[Any]], workers: int, log) -> list[Any]:
    """``fn(*args)`` in ``workers`` fresh processes, a job handed out only when a worker is free. A job that fails
    lets the others run (their work is kept) and is raised at the end. Ctrl-C or SIGTERM (here, or to a worker)
    stops everything at once: no further job starts, running ones stop as a command does (their temporary files
    removed, their locks released)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, available_cores() // workers)
    log(f"running {len(arg_lists)} job(s) in {workers} processes, {threads} thread(s) each")
    results: list[Any] = [None] * len(arg_lists)
    failure: Exception | None = None
    queued = iter(enumerate(arg_lists))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(threads,)) as pool:
        running = {}

        def hand_out() -> None:  # the next queued job, if any, to the worker that is free
            item = next(queued, None)
            if item is not None:
                running[pool.submit(_job, fn, *item[1])] = item[0]

        try:
            for _ in range(workers):
                hand_out()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index = running.pop(future)
                    try:
                        results[index] = future.result()
                    except Exception as exc:  # one job's failure: the others go on
                        failure = failure or exc
                    hand_out()
        except BaseException:  # Ctrl-C, SIGTERM
            for worker in multiprocessing.active_children():
                worker.terminate()  # SIGTERM: the worker raises Terminated where it is, or ends if it is idle
            raise
    if failure is not None:
        raise failure
    return results


def _job(fn: Callable, *args: Any) -> Any:
    with job():
        return fn(*args)


def _start_worker(threads: int) -> None:
    import os

    import torch

    stop_cleanly_on_sigterm(pool_worker=True)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def sbatch_script(command: str, slurm: SlurmConfig, name: str, array: int = 0, log_dir: str = "slurm_logs") -> str:
    """The equivalent sbatch script for users who submit by hand (pure function of its arguments).

    With ``array > 0`` the script is an array job; ``$SLURM_ARRAY_TASK_ID`` selects the task.
    """
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --time={slurm.time}",
             f"#SBATCH --mem={slurm.mem}G", f"#SBATCH --cpus-per-task={slurm.cpus}"]
    if slurm.partition:
        lines.append(f"#SBATCH --partition={slurm.partition}")
    if slurm.account:
        lines.append(f"#SBATCH --account={slurm.account}")
    if slurm.gpus:
        lines.append(f"#SBATCH --gpus-per-node={slurm.gpus}")
    if array:
        lines.append(f"#SBATCH --array=0-{array - 1}%{slurm.array_parallelism}")
        lines.append(f"#SBATCH --output={log_dir}/%A_%a.out")
    else:
        lines.append(f"#SBATCH --output={log_dir}/%j.out")
    lines.append("#SBATCH --requeue")
    lines.append("#SBATCH --signal=B:USR1@120")
    lines += [f"#SBATCH {line if line.startswith('--') else '--' + line}" for line in slurm.extra]
    lines += ["", "set -euo pipefail", *slurm.setup,
              "# on the time-limit warning, requeue this job; stainmil resumes from its last checkpoint",
              "trap 'scontrol requeue ${SLURM_JOB_ID}; exit 0' USR1",
              f"{command} &", "wait $!", ""]
    return "\n".join(lines)
