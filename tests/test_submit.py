"""python -m distnn.submit: to the real one-node Slurm of tests/cluster.py and with submitit's
local executor; a job preempted by submitit's USR2 that checkpoints, requeues through submitit
and ends with the uninterrupted job's weights; bad arguments as one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from distnn import submit as submit_cli
from tests import user_package
from tests.cluster import FINISHED
from tests.conftest import FAST, ROOT, assert_same_weights, logged_steps, run_cli

pytestmark = pytest.mark.xdist_group("cluster")

STEPS = 60
LOGGED = list(range(10, STEPS + 1, 10))  # train.log_every=10
# Synthetic data this small diverges at the default lr 0.1.
TRAIN = [*FAST, "log.tensorboard=false", "precision=fp32", "train.batch_size=8", "optim.lr=0.02",
         "data.synthetic_train=80", "data.synthetic_val=16", f"train.max_steps={STEPS}",
         "train.eval_every=1000", "train.log_every=10", "ckpt.every_steps=10", "ckpt.keep=2",
         "ckpt.epoch_end=false"]  # fmt: skip


def submit_args(work: Path, *extra: str) -> list[str]:
    options = [
        "--tasks-per-node",
        "2",
        "--time",
        "10",
        "--wait",
        "--log-dir",
        str(work / "submitit"),
    ]
    return ["-m", "distnn.submit", *options, *extra, f"run.dir={work / 'runs'}", *TRAIN]


def printed(out: str) -> tuple[int, Path, dict]:
    """Job id, run dir and the summary that `--wait` printed."""
    job_id = int(re.search(r"submitted job (\d+)", out).group(1))
    run_dir = Path(re.search(r"run dir: (\S+)", out).group(1))
    return job_id, run_dir, json.loads(out[out.index("\n{") :])


@pytest.fixture(scope="module")
def submitted(slurm_cluster, tmp_path_factory) -> tuple[int, Path, dict, str]:
    work = tmp_path_factory.mktemp("submit")
    r = run_cli(*submit_args(work), env={"SLURM_CONF": str(slurm_cluster.conf)}, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return (*printed(r.stdout), r.stdout)


def test_submit_to_slurm_waits_and_prints_the_summary(submitted):
    job_id, run_dir, result, out = submitted
    assert f"submitted job {job_id} to Slurm: 1 node(s) x 2 task(s)" in out
    assert run_dir.name == f"distnn-{job_id}"  # no run.name: <job name>-<job id>
    assert result["world_size"] == 2 and result["steps"] == STEPS
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["train_loss"] == pytest.approx(result["train_loss"], rel=1e-12)
    stdout = Path(re.search(r"stdout: +(\S+)", out).group(1))
    assert f"done: {STEPS} steps" in stdout.read_text()


@pytest.mark.timeout(300)
def test_preempted_submitit_job_requeues_and_ends_with_the_same_weights(
    slurm_cluster, submitted, tmp_path
):
    proc = subprocess.Popen(
        [sys.executable, *submit_args(tmp_path)], cwd=ROOT, text=True,
        env=slurm_cluster.env({"PYTHONPATH": str(ROOT)}),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        head = ""
        for line in iter(proc.stdout.readline, ""):  # submitted job ..., run dir: ...
            head += line
            if "run dir:" in line:
                break
        job_id = int(re.search(r"submitted job (\d+)", head).group(1))
        run_dir = Path(re.search(r"run dir: (\S+)", head).group(1))
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "step_00000010.pt").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint"
            time.sleep(0.1)
        # What Slurm sends before the time limit: submitit's USR2 to every task.
        slurm_cluster.run("scancel", "--signal=USR2", str(job_id))
        info = slurm_cluster.wait(job_id, {"PENDING"} | FINISHED)
        assert info["JobState"] == "PENDING" and info["Restarts"] == "1", info["JobState"]
        slurm_cluster.start_requeued(job_id)
        out, _ = proc.communicate(timeout=180)  # --wait waits across the requeue
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(out[out.index("\n{") :])
    assert result["steps"] == STEPS and result["world_size"] == 2
    log = (tmp_path / "submitit" / str(job_id) / f"{job_id}_0_log.out").read_text()
    stopped = int(re.search(r"preempted at step (\d+)", log).group(1))
    assert 10 <= stopped < STEPS and f"resumed at step {stopped} from" in log
    # submitit requeued what checkpoint() returned: the same run, resumed.
    requeued = submitit.helpers.DelayedSubmission.load(
        tmp_path / "submitit" / str(job_id) / f"{job_id}_submitted.pkl"
    )
    assert requeued.function.overrides[-1] == "ckpt.resume=auto"
    assert logged_steps(run_dir) == LOGGED
    assert_same_weights(run_dir, submitted[1], rtol=1e-6)


def test_submit_local_runs_here_with_the_user_s_own_package(tmp_path):
    """The job's tasks import the user's model and dataset by name, as on a node."""
    site = user_package.write(tmp_path / "site")
    own = ["model.name=userpkg.nets:SmallNet", "data.source=userpkg.data:Channels",
           "data.kwargs.n=80"]  # fmt: skip
    r = run_cli(*submit_args(tmp_path, "--local"), *own, timeout=240,
                env={"PYTHONPATH": f"{ROOT}:{site}"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    job_id, run_dir, result = printed(r.stdout)
    assert f"submitted job {job_id} here" in r.stdout
    assert result["world_size"] == 2 and result["steps"] == STEPS
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert "name: userpkg.nets:SmallNet" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--nodes", "0"], ["--nodes 0 is less than 1"]),
        (["--nodes", "two"], ["--nodes", "invalid int value: 'two'"]),
        (["--time", "1:30"], ["--time '1:30'", "H:MM:SS"]),
        (["--mem", "-4"], ["--mem -4"]),
        (["--local", "--nodes", "2"], ["--local", "needs Slurm"]),
        (["model.nmae=lenet5"], ["model.nmae"]),
    ],
    ids=["nodes-0", "nodes-word", "time-format", "mem", "local-nodes", "unknown-key"],
)
def test_bad_arguments_are_one_line_and_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        submit_cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err


def test_time_limits_in_minutes():
    assert submit_cli.minutes("90") == 90
    assert submit_cli.minutes("1:30:00") == 90
    assert submit_cli.minutes("0:00:30") == 1  # never shorter than asked
