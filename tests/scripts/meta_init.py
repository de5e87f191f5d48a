"""Under torchrun: each model built on the meta device, sharded by FSDP and initialised shard
by shard (models/deferred.py) against the same model built eagerly, as train() builds both
(seed, then models.prepare). Argument: a JSON list of cases, each a list of overrides. Rank 0
prints one JSON line: per case, whether every parameter and buffer is equal, the notes, and
the replay's peak of full tensors against the model's bytes."""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as td

from distnn import config, models, precision
from distnn.parallel.fsdp import FSDP
from distnn.train import seed_everything

td.init_process_group("gloo", timeout=timedelta(seconds=60))
cpu = torch.device("cpu")
results = []
for overrides in json.loads(sys.argv[1]):
    cfg = config.load(None, ["strategy.name=fsdp", *overrides])
    torch.rand(td.get_rank() + 1)  # what ranks drew before (data, logging) differs by rank
    seed_everything(cfg.train.seed)
    eager, _, _ = models.prepare(cfg, 10, cpu)
    seed_everything(cfg.train.seed)
    model, _, notes = models.prepare(cfg, 10, cpu, meta_init=True)
    on_meta = all(p.is_meta for p in model.parameters())
    strategy = FSDP(precision.build("fp32", cpu), cfg.strategy.fsdp, cpu)
    strategy.wrap(model)
    want = {**dict(eager.named_parameters()), **dict(eager.named_buffers())}
    got = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    differ = [
        name
        for name, t in got.items()
        if not torch.equal(t.full_tensor() if hasattr(t, "full_tensor") else t, want[name])
    ]
    local = sum(p.to_local().numel() for p in model.parameters())
    results.append({
        "overrides": overrides,
        "on_meta": on_meta,
        "same_names": sorted(got) == sorted(want),
        "differ": differ,
        "local_share": local / sum(p.numel() for p in eager.parameters()),
        "notes": notes,
        "describe": strategy.describe(),
        "peak_bytes": strategy.built.peak_bytes if strategy.built else None,
        "model_bytes": strategy.built.model_bytes if strategy.built else None,
    })  # fmt: skip
if td.get_rank() == 0:
    print(json.dumps(results))
td.destroy_process_group()
