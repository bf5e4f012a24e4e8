"""A real single-node SLURM on localhost for the tests (Debian's slurm-wlm + munge, started here).

Everything lives under one temporary folder; the daemons are stopped by their PID files afterwards.
Configuration as in shared/notes/slurm-localhost.md, with CPUs and memory read from this machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.system_deps import ensure_debian_packages

CONF = """ClusterName=ci
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s)
AuthInfo=socket={d}/munge/munge.socket.2,cred_expire=10
StateSaveLocation={d}/slurm/state
SlurmdSpoolDir={d}/slurm/spool
SlurmctldPidFile={d}/slurm/slurmctld.pid
SlurmdPidFile={d}/slurm/slurmd.pid
SlurmctldLogFile={d}/slurm/log/slurmctld.log
SlurmdLogFile={d}/slurm/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/slurm/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
{node}
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 1024
    return 4000


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> SlurmCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()  # never leave daemons behind a failed start
            raise

    def _start(self) -> SlurmCluster:
        ensure_debian_packages("slurmctld", ["slurm-wlm", "slurmctld", "slurmd", "munge"])
        d = self.root
        for sub in ("munge", "slurm/state", "slurm/spool", "slurm/log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o755)
        key = d / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o600)
        subprocess.run(["munged", "--force", f"--socket={d}/munge/munge.socket.2", f"--key-file={key}",
                        f"--log-file={d}/munge/munged.log", f"--pid-file={d}/munge/munged.pid",
                        f"--seed-file={d}/munge/munged.seed"], check=True, capture_output=True)
        cpus = os.cpu_count() or 2
        node = (f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} Boards=1 SocketsPerBoard=1 "
                f"CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={_memory_mb()} State=UNKNOWN")
        # free ports of our own: a cluster of another test process (or one still closing) never collides
        self.conf.write_text(CONF.format(d=d, node=node, ctld_port=_free_port(), slurmd_port=_free_port()))
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env, capture_output=True)
        subprocess.run(["slurmd", "-f", str(self.conf), "-N", "localhost"], check=True, env=self.env,
                       capture_output=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        logs = self.logs()
        raise RuntimeError(f"SLURM did not come up: {logs}")

    def logs(self) -> str:
        out = []
        for name in ("slurm/log/slurmctld.log", "slurm/log/slurmd.log"):
            path = self.root / name
            if path.is_file():
                out.append(f"--- {name}\n" + path.read_text()[-3000:])
        return "\n".join(out)

    def stop(self) -> None:
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
        pids = []
        for pid_file in ("slurm/slurmd.pid", "slurm/slurmctld.pid", "munge/munged.pid"):
            path = self.root / pid_file
            if path.is_file():
                try:
                    pids.append(int(path.read_text().strip()))
                except ValueError:
                    continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 5
            while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
                time.sleep(0.1)
        # job steps outlive their daemons: end this test cluster's steps and the jobs they ran
        for pattern in ("slurmstepd", "submitit.core._submit", str(self.root)):
            subprocess.run(["pkill", "-KILL", "-f", pattern], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
