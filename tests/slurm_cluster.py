"""A real one-node Slurm cluster with two fake GPUs, private to one test run.

Debian's ``munge``, ``slurmctld``, ``slurmd``, ``slurmdbd`` (with ``sacct``) and MariaDB run
from a temporary directory, on free ports, with their own munge key and socket, so they touch
no system-wide Slurm or MariaDB. The node has ``Gres=gpu:2`` backed by two character devices
made with ``mknod`` (``AutoDetect=off``), so Slurm allocates GPUs and sets
``CUDA_VISIBLE_DEVICES`` exactly as on a GPU node. :meth:`SlurmCluster.stop` cancels every job,
stops the daemons it started (by their process ids) and removes the directory.

Needs root (slurmd starts jobs as their user, mknod) and the Debian packages that ``.ci/run``
installs.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

PACKAGES = ("munge slurmctld slurmd slurmdbd slurm-client mariadb-server-core "
            "mariadb-client-core")
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "mariadb-install-db",
           "my_print_defaults")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sacct", "sacctmgr", "sinfo")
CLUSTER = "tunertest"
NODE = "tunernode"
PARTITION = "gpu"
GPUS = 2
FINAL_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def missing_requirements() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "the Slurm tests run slurmd, which must run as root"
    absent = [n for n in DAEMONS + CLIENTS if not _which(n)]
    if absent:
        return (f"{', '.join(absent)} not found; install the Debian packages: "
                f"apt-get install --no-install-recommends {PACKAGES} (.ci/run does)")
    return None


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float, logs: list[Path]) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    tails = "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-2000:]}"
                      for p in logs if p.exists())
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


class SlurmCluster:
    """Start with :meth:`start`, always :meth:`stop`; :attr:`env` points clients at it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tuner-slurm-"))
        os.chmod(self.root, 0o755)
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.devices = [self.root / "dev" / f"gpu{i}" for i in range(GPUS)]

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        for sub in ("munge", "db", "state", "spool", "dev", "log"):
            (self.root / sub).mkdir()
        os.chmod(self.root / "munge", 0o700)
        for dev in self.devices:  # character devices, as /dev/nvidia0 and /dev/nvidia1 are
            os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        self._start_munge()
        self._start_mariadb()
        self._write_config()
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        _wait("slurmdbd to register the cluster", self._add_cluster, 60,
              [self.log("slurmdbd")])
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        _wait("slurmctld", lambda: "UP" in self.run("scontrol", "ping", check=False).stdout,
              60, [self.log("slurmctld")])
        self._spawn("slurmd", ["slurmd", "-D", "-N", NODE])
        _wait("the node to be idle", lambda: self.run(
            "sinfo", "-h", "-n", NODE, "-o", "%T", check=False).stdout.strip() == "idle", 60,
            [self.log("slurmd"), self.log("slurmctld")])

    def stop(self) -> None:
        """Cancel every job, stop the daemons this object started, remove its directory."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", f"--partition={PARTITION}", check=False)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and self.run(
                    "squeue", "-h", "-o", "%i", check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- clients ------------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster."""
        full_env = {**(env or self.env), "SLURM_CONF": str(self.conf)}
        result = subprocess.run(list(cmd), capture_output=True, text=True, env=full_env,
                                cwd=cwd, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: "
                               f"{result.stderr.strip()}")
        return result

    def sbatch(self, *args: str, env: dict[str, str], cwd: Path) -> str:
        """Submit; the job id (of the whole array, for an array)."""
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def tasks(self, job: str) -> dict[str, str]:
        """``{"JOB_TASK": state}`` for every task of an array job still known to squeue."""
        out = self.run("squeue", "-h", "-r", "-j", job, "-o", "%i %T", check=False).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def gpu_of(self, task: str) -> str:
        """The GPU index Slurm allocated to a running task (``scontrol -d show job``)."""
        out = self.run("scontrol", "-d", "show", "job", task).stdout
        marker = "GRES=gpu:1(IDX:"
        start = out.index(marker) + len(marker)
        return out[start:out.index(")", start)]

    def wait_done(self, job: str, timeout: float) -> None:
        """Until no task of ``job`` is pending or running, and sacct has them all final."""
        _wait(f"job {job} to end", lambda: not self.tasks(job), timeout,
              [self.log("slurmctld")])
        _wait(f"accounting of job {job}", lambda: all(
            row["State"].split()[0] in FINAL_STATES for row in self.sacct(job)), 60,
            [self.log("slurmdbd")])

    def sacct(self, job: str) -> list[dict[str, str]]:
        fields = ["JobID", "JobName", "State", "ExitCode", "Start", "End", "Elapsed",
                  "Timelimit", "AllocTRES"]
        out = self.run("sacct", "-X", "-P", "-n", "-j", job, "--format=" + ",".join(fields),
                       check=False).stdout
        return [dict(zip(fields, line.split("|"), strict=True))
                for line in out.splitlines() if line.strip()]

    def sacct_table(self, job: str) -> str:
        """``sacct`` as a person reads it, for the test's printed report."""
        return self.run("sacct", "-X", "-j", job, "--format=JobID%12,JobName%13,State%16,"
                        "ExitCode,Start,End,Elapsed,Timelimit,AllocTRES%34").stdout

    def log(self, name: str) -> Path:
        return self.root / "log" / f"{name}.log"

    # ---- daemons ------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with (self.root / "log" / f"{name}.out").open("wb") as out:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                env=self.env, cwd=self.root)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._spawn("munged", [
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--log-file={self.log('munged')}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        _wait("munged", self.munge_socket.exists, 30, [self.root / "log" / "munged.out"])

    def _start_mariadb(self) -> None:
        data = self.root / "db" / "data"
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}",
                        "--user=root", "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True, timeout=120)
        self.db_port = _free_port()
        self._spawn("mariadbd", [
            _which("mariadbd") or "mariadbd", "--no-defaults", f"--datadir={data}",
            "--user=root", f"--port={self.db_port}", "--bind-address=127.0.0.1",
            f"--socket={self.root / 'db' / 'mysql.sock'}", "--skip-grant-tables",
            "--skip-log-bin", f"--log-error={self.log('mariadb')}",
            f"--pid-file={self.root / 'db' / 'mariadbd.pid'}",
            "--innodb-buffer-pool-size=128M", "--innodb-lock-wait-timeout=900"])

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.db_port)) == 0

        _wait("MariaDB", listening, 60, [self.log("mariadb")])

    def _add_cluster(self) -> bool:
        listed = self.run("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster",
                          check=False)
        if listed.returncode != 0:
            return False
        if CLUSTER in listed.stdout.split():
            return True
        self.run("sacctmgr", "-i", "add", "cluster", CLUSTER, check=False)
        return False

    def _write_config(self) -> None:
        r, munge = self.root, self.munge_socket
        node = (f"NodeName={NODE} NodeHostname={self.host} NodeAddr=127.0.0.1 "
                f"CPUs={os.cpu_count()} Gres=gpu:{GPUS} State=UNKNOWN")
        dbd_port, ctld_port, slurmd_port = _free_port(), _free_port(), _free_port()
        dbd = r / "slurmdbd.conf"
        dbd.write_text(textwrap.dedent(f"""\
            AuthType=auth/munge
            AuthInfo=socket={munge}
            DbdHost={self.host}
            DbdAddr=127.0.0.1
            DbdPort={dbd_port}
            SlurmUser=root
            PidFile={r}/slurmdbd.pid
            LogFile={self.log("slurmdbd")}
            StorageType=accounting_storage/mysql
            StorageHost=127.0.0.1
            StoragePort={self.db_port}
            StorageUser=root
            StorageLoc=slurm_acct_db
            """))
        dbd.chmod(0o600)
        self.conf.write_text(textwrap.dedent(f"""\
            ClusterName={CLUSTER}
            SlurmctldHost={self.host}(127.0.0.1)
            SlurmctldPort={ctld_port}
            SlurmdPort={slurmd_port}
            SlurmUser=root
            SlurmdUser=root
            AuthType=auth/munge
            AuthInfo=socket={munge}
            CredType=cred/munge
            StateSaveLocation={r}/state
            SlurmdSpoolDir={r}/spool
            SlurmctldPidFile={r}/slurmctld.pid
            SlurmdPidFile={r}/slurmd.pid
            SlurmctldLogFile={self.log("slurmctld")}
            SlurmdLogFile={self.log("slurmd")}
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_CPU
            MpiDefault=none
            ReturnToService=2
            # SIGTERM at the time limit or scancel, SIGKILL this much later (Slurm's default).
            KillWait=30
            OverTimeLimit=0
            MinJobAge=600
            MailProg=/bin/true
            JobAcctGatherType=jobacct_gather/none
            AccountingStorageType=accounting_storage/slurmdbd
            AccountingStorageHost=127.0.0.1
            AccountingStoragePort={dbd_port}
            AccountingStoragePass={munge}
            AccountingStorageTRES=gres/gpu
            GresTypes=gpu
            {node}
            PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
            """))
        (r / "gres.conf").write_text(
            f"AutoDetect=off\nName=gpu File={r}/dev/gpu[0-{GPUS - 1}]\n")
