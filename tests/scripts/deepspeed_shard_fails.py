"""distnn.train under torchrun, where DeepSpeed's write of rank 1's optimizer shard fails as on
a full disk (ENOSPC) at the checkpoint of step FAIL_STEP, after the other rank wrote its own."""

import errno
import os
import sys

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from distnn.train import main

real_save = TorchCheckpointEngine.save
target = f"step_{int(os.environ['FAIL_STEP']):08d}"


def save(self, state_dict, path: str) -> None:
    if os.environ["RANK"] == "1" and target in path and "optim_states" in path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    real_save(self, state_dict, path)


TorchCheckpointEngine.save = save
main(sys.argv[1:])
