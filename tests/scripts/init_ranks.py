"""Under torchrun: each model.init scheme, built as train() builds it (seed, then
models.prepare), gives the same weights on every rank. Rank 0 prints one JSON line."""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as td

from distnn import config, models
from distnn.train import seed_everything

td.init_process_group("gloo", timeout=timedelta(seconds=60))
result = {}
for scheme in ("default", "kaiming_normal", "xavier_uniform", "trunc_normal"):
    cfg = config.load(None, [*sys.argv[1:], f"model.init={scheme}"])
    torch.rand(td.get_rank() + 1)  # what ranks drew before (data, logging) differs by rank
    seed_everything(cfg.train.seed)
    model, _, _ = models.prepare(cfg, 10, torch.device("cpu"))
    flat = torch.cat([t.flatten().float() for t in model.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(td.get_world_size())]
    td.all_gather(gathered, flat)
    result[scheme] = {
        "same_on_every_rank": all(torch.equal(gathered[0], t) for t in gathered),
        "checksum": float(flat.double().abs().sum()),
    }
if td.get_rank() == 0:
    print(json.dumps(result))
td.destroy_process_group()
