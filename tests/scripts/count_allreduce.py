"""Train with distnn under torchrun while counting DDP's gradient all-reduces.

DDP's comm hook (parallel/ddp.py, which also marks the comm phase) is wrapped by one that
counts each bucket's all-reduce; rank 0 prints {"allreduce_calls": N}.
"""

import json
import os
import sys

from distnn import config
from distnn.parallel.ddp import DDP
from distnn.train import train

calls = 0
real_allreduce = DDP._allreduce


def counting_allreduce(self, state, bucket):
    global calls
    calls += 1
    return real_allreduce(self, state, bucket)


DDP._allreduce = counting_allreduce
train(config.load(None, sys.argv[1:]))
if os.environ["RANK"] == "0":
    print(json.dumps({"allreduce_calls": calls}))
