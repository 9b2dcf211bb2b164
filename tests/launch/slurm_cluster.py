"""A single-node Slurm cluster for the tests: munged, slurmctld and slurmd on this host.

Everything lives in one temporary folder (key, sockets, state, spool, logs, ``slurm.conf``); the
daemons run in the foreground as children of the test process, so :meth:`Cluster.stop` ends
exactly the processes :meth:`Cluster.start` began (after cancelling the cluster's jobs). The
commands (``sbatch``, ``squeue``, ``srun`` ...) find the cluster through ``SLURM_CONF``, which
:attr:`Cluster.env` sets. Starting needs root (the daemons run as root here), the binaries of
``slurm-wlm`` and ``munge``, and takes a few seconds; :func:`why_not` says why it cannot start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "srun", "sinfo")


def why_not() -> str | None:
    """Why a cluster cannot start on this machine (None when it can)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"Slurm/munge binaries missing: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "starting slurmd and slurmctld needs root"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One node (this host), one partition ``debug``, ``cpus`` CPUs (may exceed the cores)."""

    def __init__(self, root: Path, *, cpus: int = 4, mem_mb: int = 8000) -> None:
        self.root = Path(root)
        self.cpus, self.mem_mb = cpus, mem_mb
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write(self) -> None:
        for name in ("munge", "state", "spool", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
            os.chmod(self.root / name, 0o700)
        os.chmod(self.root, 0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=segtest", f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",      # more CPUs than cores: tiny jobs share them
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "MpiDefault=none", "ReturnToService=2",
            "SchedulerType=sched/backfill", "KillWait=5", "MinJobAge=5",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} "
            "State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))

    def _daemon(self, cmd: list[str], log: str) -> None:
        out = open(self.root / "log" / log, "w")
        self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True))
        out.close()

    def start(self, timeout: float = 60.0) -> "Cluster":
        """Start munged, slurmctld and slurmd; wait until the node is idle (RuntimeError with the
        daemons' log tails when it does not come up)."""
        self._write()
        r = self.root
        self._daemon(["munged", "-F", "--force", f"--socket={self.socket}",
                      f"--key-file={r}/munge/munge.key", f"--pid-file={r}/munge/munged.pid",
                      f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/seed"],
                     "munged.out")
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            self._check_alive(deadline)
        self._daemon(["slurmctld", "-D", "-c", "-f", str(self.conf)], "slurmctld.out")
        self._daemon(["slurmd", "-D", "-f", str(self.conf)], "slurmd.out")
        while True:
            self._check_alive(deadline)
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env,
                                   capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return self

    def _check_alive(self, deadline: float) -> None:
        dead = [p.args[0] for p in self.procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"Slurm did not start ({'ended: ' + ', '.join(dead) if dead else 'timeout'})"
                               f"\n{self.logs()}")
        time.sleep(0.2)

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon log."""
        parts = []
        for log in sorted((self.root / "log").glob("*")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def run(self, *cmd: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm command against this cluster (``env``: more variables)."""
        return subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True,
                              text=True, **kwargs)

    def jobs(self) -> list[str]:
        """``<jobid> <state>`` of every job in the queue, array tasks one per line."""
        return self.run("squeue", "-h", "-r", "-o", "%i %T").stdout.split("\n")[:-1]

    def stop(self) -> None:
        """Cancel every job, wait for them to leave, then end the daemons this object started."""
        if any(p.poll() is None for p in self.procs):
            self.run("scancel", "--full", "--partition", "debug")
            deadline = time.monotonic() + 30
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
