"""A real Slurm cluster on this machine: munge, slurmctld and one ``slurmd -N`` per simulated node.

    with LocalSlurm(tmp_path, nodes=("n1", "n2"), cpus=2) as slurm:
        job = slurm.sbatch(["--nodes=2", "script.sh", "arg"], cwd=repo)
        state = slurm.wait(job, timeout=600)      # polls squeue/scontrol; "COMPLETED", "FAILED", ...

Debian's Slurm (22.05) is built with MULTIPLE_SLURMD, so several slurmd daemons on one host
stand in for nodes: each has its own name, port, spool and log (DESIGN.md, "Slurm on one
machine").  Every path (config, state, spool, logs, munge key and socket) lives under the
given directory, so nothing on the host is touched but the installed packages.
:func:`ensure_slurm` installs them with apt when they are missing and it can (root + apt);
otherwise it says why not, and the caller skips.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_spin.parallel.launch import free_ports

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def ensure_slurm() -> Optional[str]:
    """None when Slurm is usable (installing it if needed), else the reason it cannot be."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and this OS cannot install it here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "--no-install-recommends", "-y", *PACKAGES]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=600)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0 or not all(shutil.which(b) for b in BINARIES):
        return f"apt-get could not install Slurm: {done.stderr[-500:]}"
    return None


class LocalSlurm:
    def __init__(self, root: Path, nodes: Sequence[str] = ("n1", "n2"), cpus: int = 2, memory_mb: int = 8000):
        self.root, self.nodes, self.cpus, self.memory_mb = Path(root), tuple(nodes), cpus, memory_mb
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[tuple[str, subprocess.Popen]] = []

    # -- life cycle -------------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurm":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                  start_new_session=True)))

    def _start(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o755)  # munged refuses a socket directory others can write
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = r / "munge" / "munge.socket"
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                               f"--seed-file={r / 'munge' / 'munged.seed'}"])
        self._wait_for(lambda: sock.exists(), 20, "munged's socket")
        ctl_port, *node_ports = free_ports(1 + len(self.nodes))
        lines = [
            "ClusterName=spintest", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={ctl_port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={sock}", f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "SlurmdParameters=config_overrides", "EnforcePartLimits=ALL",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
            "ReturnToService=2", "SchedulerType=sched/backfill", "MinJobAge=600", "KillWait=10",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait_for(lambda: self._run(["scontrol", "ping"], check=False).returncode == 0, 30, "slurmctld")
        for name in self.nodes:
            (r / "spool" / name).mkdir(exist_ok=True)
            self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
        self._wait_for(self._all_idle, 60, f"nodes {self.nodes} to be idle")

    def _all_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"local Slurm: waiting for {what} failed ({'exited: ' + str(dead) if dead else 'timeout'})"
                                   f"\n{self.logs()}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.conf.exists():
            self._run(["scancel", "--full", "-u", "root"], check=False)
        for _, p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        self.procs = []

    # -- jobs -------------------------------------------------------------------------------
    def _run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **kw.pop("env", {})}, timeout=60,
                              **kw)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr}")
        return done

    def sbatch(self, args: list[str], cwd: Path, env: Optional[dict] = None) -> str:
        return self._run(["sbatch", "--parsable", *args], cwd=cwd, env=env or {}).stdout.strip().split(";")[0]

    def job_state(self, job: str) -> str:
        out = self._run(["scontrol", "show", "job", job], check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job: str, timeout: float, poll: float = 0.5) -> str:
        """Poll until the job leaves the queue (``sbatch --wait`` polls slowly and reports 0 for a
        cancelled job); return its final JobState, cancelling it if ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN"):
                return state
            time.sleep(poll)
        self._run(["scancel", job], check=False)
        return "TIMEOUT(test)"

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)
