"""data.streams=C: global batches of C runs, one from each of C streams of the epoch's shards.
The same global batches at any world size, each rank (standing for a node) reading only its
streams' shards, and real runs on 1, 2 and 4 processes ending with the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distnn.data.streams import StreamOrder
from distnn.errors import UserError
from tests.conftest import assert_same_weights, losses, run_cli, torchrun

COUNTS = [150] * 9 + [88]  # the digits' 10 training shards of --max-count=150
C = 4


def orders(world: int, epoch: int, start: int = 0, global_batch: int = 64) -> list[StreamOrder]:
    out = [StreamOrder(COUNTS, global_batch // world, world, r, 1, 3, 1, C) for r in range(world)]
    for o in out:
        o.set_epoch(epoch, start)
    return out


def global_batches(world: int, epoch: int, start: int = 0) -> list[list[int]]:
    """Each global batch, the ranks' parts in rank order (contiguous parts: rank r holds
    positions [r·b, (r+1)·b))."""
    per_rank = [[b for _, b in o] for o in orders(world, epoch, start)]
    return [np.concatenate([r[t] for r in per_rank]).tolist() for t in range(len(per_rank[0]))]


def shards_read(order: StreamOrder) -> set[int]:
    indices = np.concatenate([b for _, b in order])
    return set((np.searchsorted(order.first, indices, side="right") - 1).tolist())


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_global_batches_do_not_depend_on_the_world_size(epoch):
    one = global_batches(1, epoch)
    assert one == global_batches(2, epoch) == global_batches(4, epoch)
    flat = [i for batch in one for i in batch]
    assert len(flat) == len(set(flat)) == orders(1, epoch)[0].steps * 64
    # Each run of 16 comes from one stream: the shards it reads are that stream's.
    o = orders(1, epoch)[0]
    dealt = o.dealt()
    for batch in one:
        for c in range(C):
            run = np.asarray(batch[c * 16 : (c + 1) * 16])
            shards = set((np.searchsorted(o.first, run, side="right") - 1).tolist())
            assert shards <= set(dealt[c].tolist())
    # Resume at batch 5 yields the tail.
    assert global_batches(2, epoch, start=5) == one[5:]


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_only_its_streams_shards(world):
    """One rank stands for one node: the shards it reads (counted from its batches) are its
    streams' alone, no two ranks read one shard, and the schedule the cache prefetches by
    names exactly those."""
    for epoch in (0, 3):
        per_rank = orders(world, epoch)
        dealt = per_rank[0].dealt()
        read = [shards_read(o) for o in per_rank]
        for r, o in enumerate(per_rank):
            mine = set(np.concatenate([dealt[c] for c, _, _ in o.parts(r)]).tolist())
            assert read[r] <= mine
            assert set(np.concatenate(o.schedule([r])).tolist()) == read[r]
        assert sum(len(s) for s in read) == len(set().union(*read))  # disjoint
        assert len(read[0]) <= -(-len(COUNTS) // world) + 1


def test_equal_shards_are_dealt_in_turn_as_the_fewest_samples_rule_deals_them():
    for epoch in range(4):
        o = StreamOrder([100] * 50, 8, 4, 0, 1, 3, 1, C)
        o.set_epoch(epoch)
        ruled = o._deal(o._shards().tolist())
        assert [d.tolist() for d in o.dealt()] == [d.tolist() for d in ruled]


def test_steps_are_the_same_every_epoch_and_bad_streams_are_one_line():
    steps = {orders(1, e)[0].steps for e in range(6)}
    assert steps == {(1438 - 3 * 150) // 4 // 16}
    for e in range(6):
        assert len(global_batches(1, e)) == 15
    with pytest.raises(UserError, match=r"data\.streams=5 must divide the global batch of 64"):
        StreamOrder(COUNTS, 32, 2, 0, 1, 3, 1, 5)
    with pytest.raises(UserError, match="at most the 10 training shards"):
        StreamOrder(COUNTS, 16, 1, 0, 1, 3, 1, 16)


@pytest.mark.timeout(400)
def test_runs_on_1_2_and_4_processes_end_with_the_same_weights(tmp_path, digits_shards):
    # 5 steps; rtol 1e-4 as the DeepSpeed equivalences: one process's convolution over 64
    # images and an all-reduce of 2 or 4 smaller ones round differently (losses differ by
    # ~1e-6 relative by step 5, as with one stream); another order differs by ~1e-2.
    run = ["--config", "configs/digits.yaml", "train.max_steps=5", "log.progress=off",
           "log.wandb.mode=disabled", "log.tensorboard=false", "train.global_batch=64",
           f"data.streams={C}", f"data.root={digits_shards}", f"run.dir={tmp_path}",
           "dist.timeout_s=60", "data.workers=0", "train.log_every=1"]  # fmt: skip
    r = run_cli("-m", "distnn.train", *run, "run.name=one", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for world in (2, 4):
        r = torchrun(world, "-m", "distnn.train", *run, f"run.name=w{world}", timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert_same_weights(tmp_path / f"w{world}", tmp_path / "one", rtol=1e-4)
        assert losses(tmp_path / f"w{world}") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_the_stream_plan_table_meets_its_goal(tmp_path):
    """benchmarks/stream_plan.py (quick: ImageNet-like, 1, 8 and 64 nodes): with one stream a
    node reads the whole dataset, with data.streams = nodes at most 1.25 × its 1/nodes."""
    r = run_cli("-m", "benchmarks.stream_plan", "--quick", f"--out={tmp_path}", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "stream_plan.json").read_text())["rows"]
    assert {(r["nodes"], r["streams"]) for r in rows} >= {(8, 1), (8, 8), (64, 1), (64, 64)}
    for row in rows:
        if row["streams"] == 1:
            assert row["share"] > 0.99
        else:
            assert row["streams"] == row["nodes"] and row["vs_ideal"] <= 1.25
    assert (
        "| ImageNet-like, 1.28 M | 4,096 | 64 | 64 |" in (tmp_path / "stream_plan.md").read_text()
    )
