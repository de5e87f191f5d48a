"""Checkpoints in object storage (ckpt.remote): real torchrun jobs upload to a real S3 server
(moto, on 127.0.0.1, reached through s3fs), are killed, and their next job starts on a new,
empty run directory (another node) and must end with the uninterrupted run's weights.

"The S3 server stopped" is its Gate closing: connections refused and open ones reset, as a
stopped server's are, while moto keeps the objects a real store would still hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distnn import config
from distnn.errors import UserError
from distnn.monitor import read_metrics
from distnn.preempt import PREEMPTED_EXIT_CODE
from distnn.train import train
from tests.conftest import (
    FAST,
    ROOT,
    assert_same_params,
    final_weights,
    run_cli,
    shared_run,
)
from tests.object_store import BUCKET, HTTPServer, S3Server
from tests.test_fault_tolerance import step_losses, worker_pids
from tests.test_resume_world import args

pytestmark = pytest.mark.timeout(300)
PREFIX = "runs/job"
# Checkpoints every 2 steps of test_resume_world's 8 (the math is the same: ckpt.* only says
# when state is written), retried for a minute.
CKPT = ["ckpt.every_steps=2", "ckpt.retry_s=60"]


@pytest.fixture
def s3(tmp_path):
    (tmp_path / "empty").mkdir()
    server = S3Server(tmp_path / "moto.log", tmp_path / "empty", PREFIX)
    yield server
    server.stop()


def uninterrupted(tmp_path_factory, strategy: str) -> Path:
    """The uninterrupted 2-rank run of the strategy (once in the session)."""
    return shared_run(tmp_path_factory, f"resume_world_{strategy}", lambda p: args(2, p, strategy))


def job(run_dir: Path, strategy: str, s3: S3Server, *extra: str) -> list[str]:
    return [*args(2, run_dir, strategy), *CKPT, f"ckpt.remote={s3.root}", *extra]


def start(command: list[str], env: dict, out: Path) -> subprocess.Popen:
    with open(out, "w") as f:
        return subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **env})  # fmt: skip


def bucket(s3: S3Server) -> dict[str, bytes]:
    """Every object under the run's prefix, by its name there."""
    import boto3

    client = boto3.client(
        "s3", endpoint_url=s3.url, aws_access_key_id="testing",
        aws_secret_access_key="testing-secret", region_name="us-east-1",
    )  # fmt: skip
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "/").get("Contents", [])
    return {
        o["Key"][len(PREFIX) + 1 :]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        for o in listed
    }


def index(s3: S3Server) -> dict:
    return json.loads(bucket(s3).get("index.json", b'{"complete": {}}'))


def wait_until(condition, proc: subprocess.Popen, out: Path, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, out.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what} never happened: {out.read_text()[-3000:]}"
        time.sleep(0.02)


def kill(proc: subprocess.Popen) -> None:
    """Every process at once, as a failed node."""
    for pid in [*worker_pids(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def assert_follows(run_dir: Path, reference: Path, resumed: int) -> None:
    """The steps after `resumed` (the new node's metrics begin there) and the final weights."""
    got, want = step_losses(run_dir), step_losses(reference)
    assert sorted(got) == list(range(resumed + 1, 9))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    assert_same_params(final_weights(run_dir), final_weights(reference), 1e-6, atol=1e-7)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_killed_job_resumes_from_the_bucket_on_an_empty_node(
    tmp_path, tmp_path_factory, s3, strategy
):
    out = tmp_path / "first.out"
    proc = start(job(tmp_path / "first", strategy, s3), s3.env, out)
    wait_until(lambda: index(s3)["complete"], proc, out, "an upload")
    kill(proc)

    r = run_cli(*job(tmp_path / "second", strategy, s3), env=s3.env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    step = int(re.search(rf"resumed at step (\d+) from {s3.root}/step_", r.stdout).group(1))
    assert step in (2, 4, 6), r.stdout
    assert_follows(tmp_path / "second", uninterrupted(tmp_path_factory, strategy), step)
    # The new job's checkpoints replaced the lost attempt's in the bucket: keep 10, all there.
    done = index(s3)
    assert done["uploading"] is None and not done["stale"]
    assert max(c["step"] for c in done["complete"].values()) == 8


def test_a_cut_short_upload_is_skipped_with_a_warning(tmp_path, tmp_path_factory, s3):
    strategy = "ddp"  # the index decides, whatever the checkpoint's form
    # Killed once the last checkpoint's file is in the bucket, before the index names it.
    r = run_cli(*job(tmp_path / "first", strategy, s3), env={**s3.env,
                "DISTNN_FAULT": "kill@upload:8"}, timeout=240)  # fmt: skip
    assert r.returncode != 0
    assert "step_00000008.pt" in bucket(s3)
    assert index(s3)["uploading"]["name"] == "step_00000008.pt"

    r = run_cli(*job(tmp_path / "second", strategy, s3), env=s3.env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    cut = f"skipping checkpoint {s3.root}/step_00000008.pt: its upload was cut short"
    assert cut in r.stderr
    step = int(re.search(rf"resumed at step (\d+) from {s3.root}/step_", r.stdout).group(1))
    assert step in (4, 6)
    assert_follows(tmp_path / "second", uninterrupted(tmp_path_factory, strategy), step)
    # The new step 8 is complete, its own bytes in the bucket.
    entry = index(s3)["complete"]["step_00000008.pt"]["files"]["step_00000008.pt"]
    local = (tmp_path / "second" / "checkpoints" / "step_00000008.pt").read_bytes()
    assert entry == [len(local), hashlib.sha256(local).hexdigest()]


def test_uploads_wait_out_a_stopped_server_and_preemption_waits_for_them(tmp_path, s3):
    # Many steps: the loop must go on through several checkpoints while the server is down.
    run_dir = tmp_path / "job"
    command = job(run_dir, "ddp", s3, "train.max_steps=400", "ckpt.every_steps=4", "ckpt.keep=3")
    out = tmp_path / "job.out"
    proc = start(command, s3.env, out)
    wait_until(lambda: index(s3)["complete"], proc, out, "an upload")
    s3.gate.close()
    last = max(c["step"] for c in index(s3)["complete"].values())  # moto, behind the gate

    def steps() -> int:
        return max([r["step"] for r in read_metrics(run_dir) if "loss" in r], default=0)

    wait_until(lambda: steps() >= last + 12, proc, out, "training past 3 checkpoints")
    rank1 = sorted(worker_pids(proc.pid))[-1]
    os.kill(rank1, signal.SIGUSR1)
    wait_until(lambda: "to reach s3://" in out.read_text(), proc, out, "waiting for the upload")
    time.sleep(2)
    assert proc.poll() is None  # the job waits for its upload
    s3.gate.open()
    proc.wait(timeout=120)
    text = out.read_text()
    assert (
        f"exitcode  : {PREEMPTED_EXIT_CODE}" in text or f"exitcode: {PREEMPTED_EXIT_CODE}" in text
    )
    stopped = int(text.split("preempted at step ")[1].split(":")[0])
    assert stopped >= last + 12
    done = index(s3)
    assert done["uploading"] is None
    assert sorted(c["step"] for c in done["complete"].values())[-1] == stopped
    assert len(done["complete"]) <= 3
    name = f"step_{stopped:08d}.pt"
    local = (run_dir / "checkpoints" / name).read_bytes()
    assert bucket(s3)[name] == local


def one_process(run_dir: Path, *overrides: str) -> dict:
    """A small run in this process (4 steps an epoch, validated at each epoch's end)."""
    cfg = config.load(None, [f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
                             *FAST, "data.synthetic_train=128", "data.synthetic_val=64",
                             "train.batch_size=32", "train.log_every=1", "ckpt.every_steps=2",
                             *overrides])  # fmt: skip
    return train(cfg)


def test_keep_k_and_best_apply_to_the_bucket(tmp_path, s3, monkeypatch):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    # The "best" by the largest validation loss: an early checkpoint, older than the newest 2.
    one_process(tmp_path / "keep", "train.max_steps=16", "ckpt.keep=2",
                "ckpt.best_metric=val_loss", "ckpt.best_mode=max",
                f"ckpt.remote={s3.root}")  # fmt: skip
    local = tmp_path / "keep" / "checkpoints"
    done = index(s3)
    newest = sorted(done["complete"], key=lambda n: done["complete"][n]["step"])[-2:]
    assert newest == sorted(p.name for p in local.glob("step_*.pt"))
    best = done["best"]
    assert best not in newest and (local / "best.pt").read_bytes() == bucket(s3)[best]
    # Counted objects: the two newest, the best and the index; nothing else stayed.
    assert sorted(bucket(s3)) == sorted([*newest, best, "index.json"])


def test_a_bad_remote_is_one_line():
    with pytest.raises(UserError, match=r"ckpt\.remote='/scratch/x' is not a URL"):
        config.load(None, ["ckpt.remote=/scratch/x"])


def test_the_checkpoint_stall_benchmark_writes_its_table(tmp_path):
    """benchmarks/ckpt_remote.py, quick: its own S3 server, both models, both sides."""
    r = run_cli("-m", "benchmarks.ckpt_remote", "--quick", "--repeats=2", f"--out={tmp_path}",
                timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "ckpt_remote.json").read_text())["rows"]
    assert [len(r["stall_remote"]["runs"]) for r in rows] == [2, 2]
    assert all(r["stall_ratio"] > 0 and r["checkpoint_bytes"] > 0 for r in rows)
    assert "| MLP 2×1024 |" in (tmp_path / "ckpt_remote.md").read_text()


def test_a_node_whose_disk_is_behind_downloads_the_newer_checkpoint(tmp_path, s3, monkeypatch):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    first, behind = tmp_path / "first", tmp_path / "behind"
    one_process(first, "train.max_steps=8", f"ckpt.remote={s3.root}")
    (behind / "checkpoints").mkdir(parents=True)  # this node saw the run only up to step 4
    shutil.copy(first / "checkpoints" / "step_00000004.pt", behind / "checkpoints")
    out = one_process(behind, "train.max_steps=10", f"ckpt.remote={s3.root}")
    assert out["steps"] == 10
    records = [r["step"] for r in read_metrics(behind) if "loss" in r]
    assert records == [9, 10]  # from the bucket's step 8, not the local step 4


def test_an_http_server_that_takes_put_holds_the_checkpoints(tmp_path, capfd):
    """PUT to store, GET to resume; such a server deletes nothing: one warning, nothing lost."""
    (tmp_path / "www").mkdir()
    http = HTTPServer(tmp_path / "http.log", tmp_path / "www", writable=True)
    try:
        url = f"{http.url}/runs/job"
        one_process(tmp_path / "first", "train.max_steps=6", "ckpt.keep=1", f"ckpt.remote={url}")
        assert "deletes nothing" in capfd.readouterr().err
        served = tmp_path / "www" / "runs" / "job"
        held = json.loads((served / "index.json").read_text())
        # keep 1: the index names the newest (and the best); step 2 is still served, unnamed.
        assert "step_00000006.pt" in held["complete"] and "step_00000002.pt" not in held["complete"]
        assert (served / "step_00000002.pt").is_file() and not held["stale"]
        one_process(tmp_path / "second", "train.max_steps=8", f"ckpt.remote={url}")
    finally:
        http.stop()
    assert f"resumed at step 6 from {url}/step_00000006.pt" in capfd.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "second") if "loss" in r] == [7, 8]


def test_a_newer_local_checkpoint_that_does_not_load_yields_to_the_bucket(tmp_path):
    bucket_url = f"file://{tmp_path / 'bucket'}"
    run_dir = tmp_path / "run"
    one_process(run_dir, "train.max_steps=8", "ckpt.keep=10", f"ckpt.remote={bucket_url}")
    newest = run_dir / "checkpoints" / "step_00000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # the local disk's copy is cut short
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        one_process(run_dir, "train.max_steps=10", f"ckpt.remote={bucket_url}")
    # From the bucket's step 8 (downloaded over the broken file), not the local step 6.
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r][-2:] == [9, 10]
    # It stays the bucket's file (the safe loader's rules), as a marker beside it says.
    mark = run_dir / "checkpoints" / ".step_00000008.pt.remote"
    assert mark.read_text().strip() == f"{bucket_url}/step_00000008.pt"


def test_an_index_naming_paths_outside_the_checkpoint_is_refused(tmp_path):
    root = tmp_path / "bucket"
    root.mkdir()
    (root / "index.json").write_text(json.dumps({
        "format": 1, "best": None, "uploading": None, "stale": [],
        "complete": {"step_00000004.pt": {"step": 4, "files": {"../../evil.pt": [1, "00"]}}},
    }))  # fmt: skip
    with pytest.raises(UserError, match=r"names 'step_00000004.pt' with objects \['../../evil"):
        one_process(tmp_path / "run", "train.max_steps=8", f"ckpt.remote=file://{root}")
    assert not (tmp_path / "evil.pt").exists()


def test_preemption_stops_waiting_after_upload_wait_s(tmp_path, s3):
    run_dir = tmp_path / "job"
    command = job(run_dir, "ddp", s3, "train.max_steps=400", "ckpt.upload_wait_s=3")
    out = tmp_path / "job.out"
    proc = start(command, s3.env, out)
    wait_until(lambda: index(s3)["complete"], proc, out, "an upload")
    s3.gate.close()  # and it stays closed
    os.kill(sorted(worker_pids(proc.pid))[-1], signal.SIGUSR1)
    proc.wait(timeout=120)
    text = out.read_text()
    assert re.search(rf"exitcode *: {PREEMPTED_EXIT_CODE}", text), text[-3000:]
    stopped = int(text.split("preempted at step ")[1].split(":")[0])
    assert "warning: stopped waiting after 3 s (ckpt.upload_wait_s)" in text
    assert max(c["step"] for c in index(s3)["complete"].values()) < stopped


def _agree(rank: int, store: str, out: str) -> None:
    import datetime

    import torch.distributed as td

    from distnn.parallel import dist

    td.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                          timeout=datetime.timedelta(seconds=30))  # fmt: skip
    try:
        dist.agree(8, "the same thing", "no remedy needed")  # alike: nothing said
        dist.agree(8 if rank == 0 else 4, "the step they resume from", "share a run directory")
    except UserError as e:
        Path(f"{out}.{rank}").write_text(str(e))
    finally:
        td.destroy_process_group()


@pytest.mark.timeout(120)
def test_ranks_that_would_resume_from_different_steps_stop_in_one_line(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_agree, args=(str(tmp_path / "store"), str(tmp_path / "err")), nprocs=2)
    want = ("the ranks differ in the step they resume from (rank 0: 8, rank 1: 4): "
            "share a run directory")  # fmt: skip
    assert [(tmp_path / f"err.{r}").read_text() for r in (0, 1)] == [want, want]


def test_a_deepspeed_checkpoint_from_the_bucket_needs_the_users_trust(tmp_path):
    """DeepSpeed's directory is pickles: from the bucket, not the run's own files."""
    common = [*FAST, f"run.dir={tmp_path}", "data.synthetic_train=64", "data.synthetic_val=16",
              "train.batch_size=8", "ckpt.every_steps=2", "strategy.name=deepspeed",
              f"ckpt.remote=file://{tmp_path / 'bucket'}"]  # fmt: skip
    r = run_cli("-m", "distnn.train", *common, "run.name=first", "train.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("-m", "distnn.train", *common, "run.name=second", "train.max_steps=6")
    assert r.returncode == 2 and "add ckpt.resume_trusted=true" in r.stderr, r.stderr[-3000:]
    r = run_cli("-m", "distnn.train", *common, "run.name=second", "train.max_steps=6",
                "ckpt.resume_trusted=true")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed at step 4 from file://{tmp_path / 'bucket'}/step_00000004 " in r.stdout
