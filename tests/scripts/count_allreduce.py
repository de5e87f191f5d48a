"""Train with distnn under torchrun while counting DDP's gradient all-reduces.

A counting comm hook wraps the real all-reduce; rank 0 prints {"allreduce_calls": N}.
"""

import json
import os
import sys

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from distnn import config
from distnn.parallel.ddp import DDP
from distnn.train import train

calls = 0
real_wrap = DDP.wrap


def counting_wrap(self, model):
    ddp = real_wrap(self, model)

    def hook(state, bucket):
        global calls
        calls += 1
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    return ddp


DDP.wrap = counting_wrap
train(config.load(None, sys.argv[1:]))
if os.environ["RANK"] == "0":
    print(json.dumps({"allreduce_calls": calls}))
