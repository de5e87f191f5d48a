"""slurm/*.sbatch and launch/ on real clusters (tests/cluster.py): one node of 2 processes by
torchrun and by srun tasks, 2 hosts of 1 process meeting by c10d rendezvous, and jobs that get
USR1, checkpoint, requeue themselves and end with the uninterrupted run's weights.

Every run trains the same 60 steps on the same shards, so every run must end with the
weights of the first one. The tests share one cluster: they run on one xdist worker.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import FINISHED, Cluster
from tests.conftest import (
    FAST,
    ROOT,
    assert_same_weights,
    logged_steps,
    run_cli,
    write_cifar,
)

pytestmark = pytest.mark.xdist_group("cluster")

STEPS = 60
LOGGED = list(range(10, STEPS + 1, 10))  # train.log_every=10
# 2 ranks x batch 8 over 80 training samples: 5 steps an epoch, a checkpoint every 10 steps.
TRAIN = [*FAST, "log.tensorboard=false", "precision=fp32", "train.batch_size=8",
         f"train.max_steps={STEPS}", "train.eval_every=1000", "train.log_every=10",
         "ckpt.every_steps=10", "ckpt.keep=2", "ckpt.epoch_end=false"]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """80 training and 16 test CIFAR-10 images in 4 + 1 shards."""
    root = tmp_path_factory.mktemp("data")
    write_cifar(root / "src", "cifar10", per_batch=16)
    r = run_cli("-m", "distnn.data.shard", "cifar10", str(root / "src"), str(root / "shards"),
                "--max-count=20", "--workers=1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return root / "shards"


def overrides(shards: Path, work: Path) -> list[str]:
    return ["data.source=shards", f"data.root={shards}", f"run.dir={work / 'runs'}", *TRAIN]


def job_env(shards: Path, work: Path, **extra: str) -> dict[str, str]:
    """What the sbatch scripts read; the job inherits it from sbatch. One thread per process
    everywhere, as torchrun sets for 2 processes a node: with 2 threads a lone process sums
    its convolutions in another order, and SGD grows that step by step (1e-3 in the weights
    after 100 steps)."""
    return {"VENV": sys.prefix, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "OVERRIDES": " ".join(overrides(shards, work)), **extra}  # fmt: skip


def submit(cluster: Cluster, work: Path, script: str, *options: str, env: dict) -> int:
    (work / "logs").mkdir(exist_ok=True)  # the scripts' --output=logs/%x-%j.out
    return cluster.sbatch(*options, str(ROOT / "slurm" / script), env=env, cwd=work)


def log(work: Path, job_id: int, name: str = "distnn") -> str:
    return (work / "logs" / f"{name}-{job_id}.out").read_text()


def finish(
    cluster: Cluster, work: Path, job_id: int, name: str = "distnn", timeout: float = 180
) -> str:
    info = cluster.wait(job_id, timeout=timeout)
    text = log(work, job_id, name)
    assert info["JobState"] == "COMPLETED", f"{info['JobState']}:\n{text[-3000:]}"
    return text


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(slurm_cluster, shards, tmp_path_factory) -> tuple[Path, str]:
    """The single-node script, 2 processes on CPUs: the run every other must reproduce."""
    work = tmp_path_factory.mktemp("reference")
    env = job_env(shards, work, NPROC_PER_NODE="2")
    job = submit(slurm_cluster, work, "train_single_node.sbatch", "--gpus-per-node=0",
                 "--job-name=ref", env=env)  # fmt: skip
    text = finish(slurm_cluster, work, job, "ref")
    return work / "runs" / f"ref-{job}", text  # RUN_NAME's default: <job name>-<job id>


def test_single_node_script_trains_two_processes_on_shards(reference):
    run_dir, text = reference
    assert "2 processes" in text and f"done: {STEPS} steps" in text
    got = summary(run_dir)
    assert got["world_size"] == 2 and got["steps"] == STEPS
    assert logged_steps(run_dir) == LOGGED


@pytest.mark.timeout(480)
@pytest.mark.parametrize(
    ("strategy", "rtol"),
    # DeepSpeed's ZeRO-2 sums gradients in its own buckets: last bits differ from DDP's.
    [("ddp", 1e-5), ("deepspeed", 1e-4)],
)
def test_srun_tasks_script_equals_torchrun(slurm_cluster, shards, reference, tmp_path,
                                           strategy, rtol):  # fmt: skip
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    env = job_env(shards, tmp_path, RUN_NAME="tasks")
    # srun tasks have SLURM_LOCALID but no LOCAL_RANK, which DeepSpeed itself asserts.
    env["OVERRIDES"] += f" strategy.name={strategy}"
    job = submit(slurm_cluster, tmp_path, "train_srun_tasks.sbatch", "--gpus-per-node=0",
                 "--ntasks-per-node=2", env=env)  # fmt: skip
    # Two tasks importing DeepSpeed on 2 cores take a minute alone, several beside other tests.
    text = finish(slurm_cluster, tmp_path, job, timeout=420 if strategy == "deepspeed" else 180)
    assert "2 tasks on 1 nodes" in text
    assert f"strategy: {strategy}" in text
    assert summary(tmp_path / "runs" / "tasks")["world_size"] == 2
    assert_same_weights(tmp_path / "runs" / "tasks", reference[0], rtol=rtol)


def wait_for(path: Path, cluster: Cluster, job_id: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        state = cluster.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} is {state} before {path}"
        time.sleep(0.1)


def preempt_and_resume(cluster: Cluster, work: Path, job_id: int, run_dir: Path) -> str:
    """USR1 to the batch shell mid-run; the job must requeue itself and finish."""
    wait_for(run_dir / "checkpoints" / "step_00000010.pt", cluster, job_id)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
    info = cluster.wait(job_id, {"PENDING"} | FINISHED)
    assert info["JobState"] == "PENDING", f"not requeued:\n{log(work, job_id)[-3000:]}"
    assert info["Restarts"] == "1"
    cluster.start_requeued(job_id)
    text = finish(cluster, work, job_id)
    stopped = int(re.search(r"preempted at step (\d+)", text).group(1))
    assert 10 <= stopped < STEPS, text[-3000:]
    assert f"resumed at step {stopped} from" in text
    # By rank 0 (Slurm may end it before scontrol's answer: the rerun below is the proof).
    assert f"preempted: scontrol requeue {job_id}\n" in text
    assert "(restart 1)" in text  # the same log, appended to by the rerun
    # Each step once: the rerun continued where the checkpoint was, lost and repeated nothing.
    assert logged_steps(run_dir) == LOGGED
    return text


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("cluster", "script", "nproc", "rtol"),
    [
        ("slurm_cluster", "train_single_node.sbatch", "2", 1e-6),
        ("two_host_cluster", "train_multi_node.sbatch", "1", 1e-5),
    ],
    ids=["single-node", "two-hosts"],
)
def test_preempted_job_requeues_and_ends_with_the_same_weights(
    request, cluster, script, nproc, rtol, shards, reference, tmp_path
):
    cluster = request.getfixturevalue(cluster)
    env = job_env(shards, tmp_path, NPROC_PER_NODE=nproc, RUN_NAME="preempted")
    job = submit(cluster, tmp_path, script, "--gpus-per-node=0", env=env)
    preempt_and_resume(cluster, tmp_path, job, tmp_path / "runs" / "preempted")
    assert_same_weights(tmp_path / "runs" / "preempted", reference[0], rtol=rtol)


def test_two_hosts_by_rendezvous_equal_one_node_of_two(two_host_cluster, shards, reference,
                                                        tmp_path):  # fmt: skip
    env = job_env(shards, tmp_path, NPROC_PER_NODE="1", RUN_NAME="hosts")
    job = submit(two_host_cluster, tmp_path, "train_multi_node.sbatch", "--gpus-per-node=0",
                 env=env)  # fmt: skip
    text = finish(two_host_cluster, tmp_path, job)
    # 1 process per node and world size 2: both hosts joined the rendezvous on dnn1.
    assert "2 nodes x 1 processes, rendezvous dnn1:" in text
    got, want = summary(tmp_path / "runs" / "hosts"), summary(reference[0])
    assert got["world_size"] == 2
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
    assert_same_weights(tmp_path / "runs" / "hosts", reference[0], rtol=1e-5)


def test_launch_script_across_two_hosts_without_slurm(two_host_cluster, shards, reference,
                                                       tmp_path):  # fmt: skip
    env = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "dnn1", "MASTER_PORT": "29400",
           "RDZV_ID": "launch", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    command = ["bash", str(ROOT / "launch" / "multi_node.sh"),
               *overrides(shards, tmp_path), "run.name=launch"]  # fmt: skip
    nodes = [two_host_cluster.popen(host, *command, env=env, cwd=ROOT)
             for host in two_host_cluster.hosts]  # fmt: skip
    try:
        for node in nodes:
            out, _ = node.communicate(timeout=180)
            assert node.returncode == 0, out[-3000:]
    finally:
        for node in nodes:
            node.kill()
    assert summary(tmp_path / "runs" / "launch")["world_size"] == 2
    assert_same_weights(tmp_path / "runs" / "launch", reference[0], rtol=1e-5)
