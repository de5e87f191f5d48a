"""Real Slurm clusters for the tests, started once per session and always torn down.

- `single_node(root)`: slurmctld + slurmd on this host: one node, `localhost`, every core.
- `two_hosts(root)`: two network namespaces joined by a veth pair, each a "host" with its own
  address (10.201.0.1, .2), hostname (dnn1, dnn2) and /etc/hosts; slurmctld + slurmd on dnn1,
  slurmd on dnn2. Commands run on a host through `Cluster.command(host, ...)`.

Both use one munged: its socket is a file, which every network namespace reaches. Slurm and
munge are installed with apt-get when missing; where the machine cannot run a cluster (not
root, no network namespaces, apt-get fails) the caller is skipped with the reason, or fails with
it where DISTNN_REQUIRE_CLUSTER=1 says the machine must run one (CI: `.ci/run`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("sbatch", "slurmctld", "slurmd", "munged", "scontrol", "squeue")
# States a job leaves the queue in (scontrol keeps them for MinJobAge, 300 s).
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
HOSTS = {"dnn1": "10.201.0.1", "dnn2": "10.201.0.2"}
# Set on machines that must run the clusters (CI is root, with apt-get and namespaces): there a
# missing cluster is a defect, and its tests fail instead of skipping green.
REQUIRE = "DISTNN_REQUIRE_CLUSTER"


def run(
    cmd: list[str], timeout: float = 60, check: bool = True, **kw
) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def wait_until(ready: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- what the machine must have ---------------------------------------------------------------


def unavailable(reason: str) -> NoReturn:
    """This machine cannot run what the test needs: skip, or fail where REQUIRE says it must."""
    required = os.environ.get(REQUIRE, "")
    if required not in ("", "0"):
        pytest.fail(f"{reason} ({REQUIRE}={required}: this machine must run Slurm)", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    if os.geteuid() != 0:
        unavailable("a Slurm cluster needs root: slurmd runs jobs as any user, munged as munge")


def install(programs: Sequence[str] = PROGRAMS) -> None:
    """Debian's Slurm and munge, unless `programs` are already there."""
    if all(map(shutil.which, programs)):
        return
    require_root()
    if not shutil.which("apt-get"):
        unavailable(f"Slurm is not installed and there is no apt-get to install {PACKAGES}")
    # One install at a time: xdist workers (test_env's scontrol, the clusters) would otherwise
    # race for dpkg's lock, and the loser's apt-get fails.
    with open(Path(tempfile.gettempdir()) / "distnn-slurm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(map(shutil.which, programs)):
            _apt_install()


def _apt_install() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        try:
            result = run(cmd, timeout=600, check=False, env=env)
        except subprocess.TimeoutExpired:
            unavailable(f"{' '.join(cmd)} took over 600 s")
        if result.returncode != 0:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
            unavailable(f"{' '.join(cmd[:2])} failed, cannot install Slurm: {last}")


def munge_answers() -> bool:
    cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    if cred.returncode != 0:
        return False
    return (
        subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode
        == 0
    )


@contextlib.contextmanager
def munge(log: Path) -> Iterator[None]:
    """A munged for the session, or the one that already answers (then left alone)."""
    if munge_answers():
        yield
        return
    socket_dir = Path("/run/munge")
    socket_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(socket_dir, "munge", "munge")
    # In the foreground: a daemonized munged leaves zombies here, and its pid is ours to stop.
    with daemon(
        ["/usr/sbin/munged", "-F"], log, user="munge", group="munge", extra_groups=[]
    ) as proc:
        wait_until(
            lambda: proc.poll() is None and munge_answers(),
            15,
            f"munged did not answer (log: {log})",
        )
        yield


@contextlib.contextmanager
def daemon(cmd: list[str], log: Path, env: dict | None = None, **kw) -> Iterator[subprocess.Popen]:
    with open(log, "ab") as out:
        # A session of its own: a Ctrl-C of pytest reaches pytest, which then stops it here.
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, **kw
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# --- a cluster --------------------------------------------------------------------------------


def write_conf(root: Path, controller: str, nodes: dict[str, str], ports: tuple[int, int]) -> Path:
    """slurm.conf for `nodes` (name -> address), state and logs under root."""
    cpus = os.cpu_count() or 1
    lines = [
        "ClusterName=distnn",
        f"SlurmctldHost={controller}({nodes[controller]})",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "ReturnToService=2",
        "KillWait=10",  # SIGTERM to SIGKILL when a job is cancelled: teardown stays short
        # A job starts 0.6 s after sbatch instead of 2.5 s: no batching, no throttling.
        "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool-%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd-%n.log",
        *(
            f"NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory=1000"
            for name, addr in nodes.items()
        ),
        f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP",
    ]
    (root / "state").mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


@dataclass
class Cluster:
    root: Path
    conf: Path
    hosts: list[str]
    prefix: Callable[[str], list[str]]  # what runs a command on a host

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def command(self, host: str, *cmd: str) -> list[str]:
        return [*self.prefix(host), *cmd]

    def run(
        self,
        *cmd: str,
        host: str | None = None,
        env: dict | None = None,
        cwd: Path | None = None,
        timeout: float = 60,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        """A command on `host` (default: the controller's), with this cluster's SLURM_CONF."""
        full = self.command(host or self.hosts[0], *cmd)
        return run(full, timeout=timeout, check=check, env=self.env(env), cwd=cwd)

    def popen(
        self, host: str, *cmd: str, env: dict | None = None, cwd: Path | None = None
    ) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(host, *cmd),
            env=self.env(env),
            cwd=cwd,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> int:
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict: JobState, Restarts, ExitCode, StdOut, ..."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(
        self, job_id: int, states: set[str] = FINISHED, timeout: float = 180
    ) -> dict[str, str]:
        """Poll until the job is in one of `states` (`sbatch --wait` polls at 2, 8, 32 s)."""
        info: dict[str, str] = {}

        def reached() -> bool:
            info.update(self.job(job_id))
            return info["JobState"] in states

        wait_until(reached, timeout, f"job {job_id} did not reach {sorted(states)}", every=0.3)
        return info

    def start_requeued(self, job_id: int) -> None:
        """Start a requeued job now instead of after its BeginTime (about 120 s). Only once
        its nodes are done with the first run, and in a later second than the requeue: slurmd
        stamps credentials in whole seconds, and one from the second of the requeue counts as
        revoked ("Job credential revoked", the rerun killed before it starts)."""
        self.wait_idle()
        time.sleep(1.2)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def cancel_all(self) -> None:
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False)
            with contextlib.suppress(TimeoutError):
                wait_until(
                    lambda: not self.run("squeue", "-h", check=False).stdout.strip(),
                    30,
                    "jobs did not end",
                )

    def wait_idle(self, daemons: list[subprocess.Popen] = ()) -> None:
        """Every node idle: up, and done with the jobs it ran (their ends take a moment)."""

        def idle() -> bool:
            for proc in daemons:
                if proc.poll() is not None:
                    logs = "\n".join(p.read_text()[-1500:] for p in self.root.glob("*.log"))
                    raise RuntimeError(f"{proc.args} exited {proc.returncode}:\n{logs}")
            out = self.run("sinfo", "-h", "-t", "idle", "-o", "%D", check=False).stdout
            return sum(int(n) for n in out.split()) == len(self.hosts)

        wait_until(idle, 30, f"{len(self.hosts)} Slurm nodes were not idle")


@contextlib.contextmanager
def _slurm(
    root: Path, hosts: list[str], prefix: Callable[[str], list[str]], ports: tuple[int, int]
) -> Iterator[Cluster]:
    """slurmctld on the first host, slurmd on each; every job cancelled before they stop."""
    nodes = {h: HOSTS.get(h, "127.0.0.1") for h in hosts}
    cluster = Cluster(root, write_conf(root, hosts[0], nodes, ports), hosts, prefix)
    with contextlib.ExitStack() as stack:

        def start(host: str, log: str, *cmd: str) -> subprocess.Popen:
            command = cluster.command(host, *cmd)
            return stack.enter_context(daemon(command, root / log, cluster.env()))

        daemons = [start(hosts[0], "slurmctld.out", "slurmctld", "-D", "-i")]
        daemons += [start(h, f"slurmd-{h}.out", "slurmd", "-D", "-N", h) for h in hosts]
        stack.callback(cluster.cancel_all)  # runs first: exit callbacks go in reverse
        cluster.wait_idle(daemons)
        yield cluster


@contextlib.contextmanager
def single_node(root: Path) -> Iterator[Cluster]:
    install()
    require_root()
    # Ports of our own: a system Slurm on this host keeps its 6817/6818.
    ports = (free_port(), free_port())
    with munge(root / "munged.log"), _slurm(root, ["localhost"], lambda h: [], ports) as cluster:
        yield cluster


# --- two hosts --------------------------------------------------------------------------------


@contextlib.contextmanager
def network_namespaces(tag: str) -> Iterator[list[str]]:
    """Two namespaces joined by a veth pair; deleted at the end with what still runs in them."""
    names = [f"distnn{tag}{i}" for i in (1, 2)]
    try:
        for i, ns in enumerate(names):
            result = run(["ip", "netns", "add", ns], check=False)
            if result.returncode != 0:
                if i == 0:
                    unavailable(f"cannot make network namespaces: {result.stderr.strip()}")
                raise RuntimeError(result.stderr)
        veths = [f"v{tag}{i}" for i in (1, 2)]
        pair = f"{veths[0]} netns {names[0]} type veth peer name {veths[1]} netns {names[1]}"
        run(["ip", "link", "add", *pair.split()])
        for ns, veth, addr in zip(names, veths, HOSTS.values(), strict=True):
            run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", veth])
            run(["ip", "-n", ns, "link", "set", veth, "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        yield names
    finally:
        for ns in names:
            # Job processes the daemons left (all started by this session) keep a namespace.
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            run(["ip", "netns", "delete", ns], check=False)


def host_prefix(netns: dict[str, str], hosts_file: Path, hostname: str) -> list[str]:
    """Run as `hostname` in its namespace. A mount namespace of its own gives it its own
    /etc/hosts and a UTS one its hostname; `ip netns exec` would also remount /sys, where
    slurmd then finds no cgroup filesystem."""
    script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
    enter = (
        f"nsenter --net=/run/netns/{netns[hostname]} unshare --uts --mount --propagation private"
    )
    return [*enter.split(), "sh", "-c", script, "sh", str(hosts_file), hostname]


@contextlib.contextmanager
def two_hosts(root: Path) -> Iterator[Cluster]:
    install()
    require_root()
    if not all(map(shutil.which, ("ip", "nsenter", "unshare"))):
        unavailable("two hosts need ip (iproute2), nsenter and unshare (util-linux)")
    hosts_file = root / "hosts"
    hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in HOSTS.items()))
    with munge(root / "munged.log"), network_namespaces(str(os.getpid())) as netns:
        by_host = dict(zip(HOSTS, netns, strict=True))
        # In namespaces of their own the daemons have Slurm's default ports to themselves.
        with _slurm(
            root, list(HOSTS), partial(host_prefix, by_host, hosts_file), (6817, 6818)
        ) as c:
            yield c
