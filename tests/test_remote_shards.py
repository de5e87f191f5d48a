"""Shards in object storage: the bundled digits, sharded, uploaded to a real S3 server (moto) and
served by a real HTTP server on 127.0.0.1, trained from by real torchrun processes through the
node-local cache (distnn/storage/, distnn/data/fetch.py). Every run must end with the weights
of the same run from the local copy; the cache's ledger says what each node downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distnn import storage
from distnn.data import manifest as mf
from distnn.errors import UserError
from distnn.monitor import read_metrics
from tests.cluster import free_port
from tests.conftest import ROOT, assert_same_weights, run_cli, shared, torchrun
from tests.object_store import BUCKET, HTTPServer, S3Server

pytestmark = pytest.mark.timeout(300)

# The demo's recipe (configs/digits.yaml), 2 epochs of global batch 64 on 2 processes.
RUN = ["--config", "configs/digits.yaml", "train.epochs=2", "train.log_every=1",
       "log.progress=off", "log.wandb.mode=disabled", "log.tensorboard=false",
       "ckpt.resume=never", "dist.timeout_s=60", "data.retry_s=30"]  # fmt: skip
SECRET = "testing-secret"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_shards) -> Path:
    """The 2-process run from the local shards."""

    def build(path: Path) -> None:
        r = torchrun(2, "-m", "distnn.train", *RUN, f"data.root={digits_shards}",
                     f"run.dir={path.parent}", f"run.name={path.name}")  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]

    return shared(tmp_path_factory, "digits_shards_reference", build)


@pytest.fixture
def s3(tmp_path, digits_shards):
    server = S3Server(tmp_path / "moto.log", digits_shards, "digits")
    yield server
    server.stop()


def dataset_bytes(root: Path) -> int:
    m = mf.load(root)
    return sum(s.bytes + (root / s.index).stat().st_size for k in m.splits for s in m.split(k))


def downloads(cache_dir: Path, root: str) -> dict[str, int]:
    """Downloads per file in a node's cache of `root`, from the cache's own ledger."""
    cache = storage.Cache(storage.Remote(root), cache_dir)
    return cache.counts()[2]


def train_remote(tmp_path: Path, name: str, root: str, env: dict, *extra: str) -> Path:
    r = torchrun(2, "-m", "distnn.train", *RUN, f"data.root={root}", f"run.dir={tmp_path}",
                 f"run.name={name}", f"data.cache_dir={tmp_path / 'cache'}", *extra,
                 env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / name


def test_s3_and_http_train_like_the_local_copy(tmp_path, s3, digits_shards, reference):
    # Credentials from the AWS environment; a secret given in data.storage_options too, which
    # no file of the run may hold.
    run = train_remote(tmp_path, "s3", s3.root, s3.env, "data.storage_options.key=testing",
                       f"data.storage_options.secret={SECRET}")  # fmt: skip
    assert_same_weights(run, reference, rtol=1e-6)
    # Two local ranks, one download of each file (shards and indexes); nothing else fetched.
    got = downloads(tmp_path / "cache", s3.root)
    assert got == {p.name: 1 for p in digits_shards.iterdir() if p.name != mf.NAME}
    records = [r for r in read_metrics(run) if "loss" in r]
    assert records[-1]["cache_bytes"] == dataset_bytes(digits_shards)
    written = [p for p in run.rglob("*") if p.is_file()]
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]
    assert "<redacted>" in (run / "config.yaml").read_text()

    http = HTTPServer(tmp_path / "http.log", digits_shards)
    try:
        run = train_remote(tmp_path, "http", http.url, {})
    finally:
        http.stop()
    assert_same_weights(run, reference, rtol=1e-6)


def test_a_cache_of_two_shards_gives_the_same_weights(tmp_path, s3, digits_shards, reference):
    largest = max(p.stat().st_size for p in digits_shards.glob("*.tar"))
    run = train_remote(tmp_path, "small", s3.root, s3.env, f"data.cache_limit={2 * largest}")
    assert_same_weights(run, reference, rtol=1e-6)
    # Each shard fetched at most once per epoch on this node (the order says when it is needed
    # again), so an epoch downloads at most the dataset.
    got = downloads(tmp_path / "cache", s3.root)
    assert max(got.values()) <= 2, got
    records = [r for r in read_metrics(run) if "loss" in r]
    first = [r for r in records if r["epoch"] <= 1.0][-1]["cache_bytes"]
    assert first <= dataset_bytes(digits_shards)
    assert records[-1]["cache_bytes"] - first <= dataset_bytes(digits_shards)
    held = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*.tar"))
    assert held < dataset_bytes(digits_shards)


def test_two_nodes_download_each_shard_once_per_node(tmp_path, s3, digits_shards, reference):
    """launch/multi_node.sh twice: two one-process nodes with caches of their own."""
    port = free_port()
    nodes = []
    for rank in range(2):
        env = {**os.environ, **s3.env, "NNODES": "2", "NPROC_PER_NODE": "1",
               "RDZV_BACKEND": "static", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHON": sys.executable,
               "PYTHONPATH": str(ROOT)}  # fmt: skip
        args = [
            *RUN,
            f"data.root={s3.root}",
            f"run.dir={tmp_path}",
            "run.name=nodes",
            f"data.cache_dir={tmp_path / f'cache{rank}'}",
        ]
        with open(tmp_path / f"node{rank}.log", "w") as log:
            script = str(ROOT / "launch" / "multi_node.sh")
            nodes.append(subprocess.Popen(["bash", script, *args], cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    for rank, proc in enumerate(nodes):
        assert proc.wait(timeout=240) == 0, (tmp_path / f"node{rank}.log").read_text()[-3000:]
    assert_same_weights(tmp_path / "nodes", reference, rtol=1e-6)
    # Every node reads every training shard (today's order: a global batch is a run of the
    # stream, every rank reading its share) and its own part of the val shards, once.
    got = [downloads(tmp_path / f"cache{rank}", s3.root) for rank in range(2)]
    train = {p.name for p in digits_shards.glob("train-*")}
    for node in got:
        assert set(node.values()) == {1} and train <= node.keys()
    val = {p.name for p in digits_shards.glob("val-*")}
    assert (got[0].keys() | got[1].keys()) - train == val


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    start = time.monotonic()
    while not any(r.get("step", 0) >= step for r in _records(run)):
        assert proc.poll() is None, "the run ended first"
        assert time.monotonic() - start < timeout, f"no step {step} in {timeout} s"
        time.sleep(0.02)


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def outage_run(tmp_path: Path, name: str, s3: S3Server, *extra: str) -> subprocess.Popen:
    """2 processes reading s3 through a cache of 2 shards (so they fetch all along)."""
    env = {**os.environ, **s3.env, "PYTHONPATH": str(ROOT)}
    largest = max(p.stat().st_size for p in s3.source.glob("*.tar"))
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "distnn.train", *RUN, f"data.root={s3.root}", f"run.dir={tmp_path}",
            f"run.name={name}", f"data.cache_dir={tmp_path / name}-cache",
            f"data.cache_limit={2 * largest}", "data.prefetch_shards=1", *extra]  # fmt: skip
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def test_an_outage_of_5_s_changes_nothing(tmp_path, s3, reference):
    """The S3 server stops mid-epoch and comes back 5 s later with the same data (moto keeps
    nothing in memory: the same files are uploaded again)."""
    proc = outage_run(tmp_path, "outage", s3)
    wait_for_step(tmp_path / "outage", 3, proc)
    s3.stop()
    time.sleep(5)
    s3.restart()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert_same_weights(tmp_path / "outage", reference, rtol=1e-6)


def test_storage_gone_for_good_is_one_line(tmp_path, s3):
    retry_s = 5
    proc = outage_run(tmp_path, "gone", s3, f"data.retry_s={retry_s}")
    wait_for_step(tmp_path / "gone", 3, proc)
    s3.stop()
    stopped = time.monotonic()
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - stopped
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors, err[-3000:]
    assert s3.root.removeprefix("s3://") in errors[0] and "data.retry_s" in errors[0], errors
    assert took < retry_s + 10 + 10, took  # + 10: torchrun's own teardown on a loaded machine


def test_a_missing_remote_manifest_is_one_line(tmp_path, s3):
    r = run_cli("-m", "distnn.train", *RUN, f"data.root={s3.root}-nothing-here",
                f"run.dir={tmp_path}", env=s3.env)  # fmt: skip
    assert r.returncode == 2
    assert "no shard manifest at" in r.stderr and "-nothing-here/manifest.json" in r.stderr


def test_the_remote_throughput_benchmark_writes_its_table(tmp_path):
    """benchmarks/remote_throughput.py, quick: its own S3 server, both sizes, 1 and 2 workers,
    cold and warm, each against local disk (the figures are recorded by `make bench`)."""
    r = run_cli("-m", "benchmarks.remote_throughput", "--quick", "--repeats=1",
                f"--out={tmp_path}", timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "remote_throughput.json").read_text())["rows"]
    assert len(rows) == 8 and all(row["local"]["median"] > 0 < row["ratio"] for row in rows)
    assert "| ImageNet-like JPEG | warm | 2 |" in (tmp_path / "remote_throughput.md").read_text()


def test_the_sharder_writes_to_s3_and_training_reads_that(tmp_path, s3, digits_shards, monkeypatch):
    """`python -m distnn.data.shard ... s3://...`: staged locally, uploaded (manifest.json
    last); a re-run uploads only the manifest; the loader reads the upload back."""
    url = f"s3://{BUCKET}/resharded"
    shard = ["-m", "distnn.data.shard", "imagefolder", str(digits_shards.parent / "digits-src"),
             url, "--max-count=150", f"--staging={tmp_path / 'staging'}"]  # fmt: skip
    r = run_cli(*shard, env=s3.env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{url}: 27 files uploaded" in r.stdout  # 13 shards, 13 indexes, the manifest
    r = run_cli(*shard, env=s3.env, timeout=240)
    assert f"{url}: 1 files uploaded" in r.stdout, r.stdout + r.stderr[-2000:]
    local = mf.load(digits_shards)
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    remote = mf.load(url, storage.files(url, {}, 30, str(tmp_path / "cache")))
    for split in local.splits:
        assert [s.sha256 for s in remote.split(split)] == [s.sha256 for s in local.split(split)]
    run = train_remote(tmp_path, "resharded", url, s3.env, "train.max_steps=3")
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]


def test_a_pipe_url_reads_through_the_users_own_command(tmp_path, digits_shards, reference):
    """`data.root=pipe:COMMAND` as webdataset has it: `{}` is each file's name."""
    run = train_remote(tmp_path, "pipe", f"pipe:cat {digits_shards}/{{}}", {})
    assert_same_weights(run, reference, rtol=1e-6)
    assert set(downloads(tmp_path / "cache", f"pipe:cat {digits_shards}/{{}}").values()) == {1}


def test_a_short_read_is_retried_and_a_wrong_file_is_refused_once(tmp_path, digits_shards):
    """A download that ends early without an error (a pipe: command that exits 0 after part of
    the file) is fetched again; one whose sha256 is wrong is refused, and a process that
    waited for it is told at once."""
    tar = next(digits_shards.glob("train-*.tar"))
    calls = tmp_path / "calls"
    # First call: half the file, exit 0; later calls: all of it.
    half = tar.stat().st_size // 2
    command = (f"pipe:if [ -e {calls} ]; then cat {digits_shards}/{{}}; "
               f"else touch {calls}; head -c {half} {digits_shards}/{{}}; fi")  # fmt: skip
    cache = storage.files(command, {}, 30, str(tmp_path / "cache"))
    size, sha = tar.stat().st_size, mf.sha256_file(tar)
    assert cache.get(tar.name, size, sha).read_bytes() == tar.read_bytes()
    other = storage.files(f"pipe:cat {digits_shards}/{{}}", {}, 30, str(tmp_path / "c2"))
    with pytest.raises(storage.Unverified, match="sha256"):
        other.get(tar.name, size, "0" * 64)
    assert not other.has(tar.name) and other.counts()[0] == 0


def test_the_default_cache_is_this_users_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path))
    mine = storage.default_cache_dir()
    assert mine == tmp_path / f"distnn-cache-{os.getuid()}"
    assert mine.stat().st_mode & 0o777 == 0o700
    mine.chmod(0o777)  # as if another user had made it for everyone
    with pytest.raises(UserError) as e:
        storage.default_cache_dir()
    assert "this user's alone" in str(e.value)
