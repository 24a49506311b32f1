"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd (Debian's slurm-wlm
and munge, installed by `make test`) started by the test on 127.0.0.1 with their own key, ports,
state and spool folders, and stopped by PID at the end. Jobs run as the tests' user."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

from .servers import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")


def missing() -> list[str]:
    return [b for b in BINARIES if not (shutil.which(b) or os.path.exists(f"/usr/sbin/{b}"))]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """``localhost`` with ``cpus`` CPUs in partition ``debug``; ``env`` is what clients need (SLURM_CONF)."""

    def __init__(self, workdir: str, cpus: int = 2):
        self.workdir = str(workdir)
        self.cpus = cpus
        self.conf = os.path.join(self.workdir, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.pids: dict[str, str] = {}

    def _path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)

    def start(self) -> "SlurmCluster":
        for folder in ("state", "spool", "log"):
            os.makedirs(self._path(folder), exist_ok=True)
        key = self._path("munge.key")
        with open(key, "wb") as handle:
            handle.write(os.urandom(1024))
        os.chmod(key, 0o400)
        socket = self._path("munge.sock")
        subprocess.run([_binary("munged"), f"--key-file={key}", f"--socket={socket}",
                        f"--pid-file={self._path('munged.pid')}", f"--log-file={self._path('log', 'munged.log')}",
                        f"--seed-file={self._path('munge.seed')}", "--force"], check=True, timeout=30)
        self.pids["munged"] = self._path("munged.pid")
        with open(self.conf, "w") as handle:
            handle.write(f"""ClusterName=medmoco-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self._path('state')}
SlurmdSpoolDir={self._path('spool')}
SlurmctldPidFile={self._path('slurmctld.pid')}
SlurmdPidFile={self._path('slurmd.pid')}
SlurmctldLogFile={self._path('log', 'slurmctld.log')}
SlurmdLogFile={self._path('log', 'slurmd.log')}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        subprocess.run([_binary("slurmctld"), "-f", self.conf], check=True, env=self.env, timeout=30)
        self.pids["slurmctld"] = self._path("slurmctld.pid")
        subprocess.run([_binary("slurmd"), "-f", self.conf, "-N", "localhost"], check=True, env=self.env, timeout=30)
        self.pids["slurmd"] = self._path("slurmd.pid")
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env).stdout
            if out.strip() in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"slurmd did not come up: {open(self._path('log', 'slurmd.log')).read()[-2000:]}")

    def stop(self) -> None:
        """Stop slurmd, slurmctld and munged by the PIDs they wrote."""
        subprocess.run(["scancel", "--full", "-u", str(os.getuid())], env=self.env, capture_output=True)
        for name in ("slurmd", "slurmctld", "munged"):
            try:
                pid = int(open(self.pids[name]).read().strip())
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except (KeyError, OSError, ValueError):
                pass

    def sbatch(self, *args, env: dict | None = None, cwd: str | None = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd,
                             env={**self.env, **(env or {})}, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             env=self.env).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s")

    def scontrol(self, *args) -> None:
        subprocess.run(["scontrol", *args], check=True, env=self.env, capture_output=True, timeout=60)

    def scancel(self, *args) -> None:
        subprocess.run(["scancel", *args], check=True, env=self.env, capture_output=True, timeout=60)
