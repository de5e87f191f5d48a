"""Compile the DeepSpeed C++ ops distnn uses (CPU Adam for optimizer offload, the
shared-memory all-reduce of DeepSpeed's CPU backend) at `make setup`, not in the first run
that needs them: DeepSpeed installs with DS_BUILD_OPS=0 and JIT-builds them into
~/.cache/torch_extensions (about a minute on 2 cores), again whenever the venv's path changes.
An op this machine cannot build is reported and left to build on first use."""

from __future__ import annotations

import time

from deepspeed.accelerator import get_accelerator

OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")


def main() -> None:
    accelerator = get_accelerator()
    for name in OPS:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"{name}: not available with the {accelerator.device_name()} accelerator")
            continue
        start = time.perf_counter()
        try:
            builder.load(verbose=False)
        except Exception as e:  # a missing compiler or CUDA toolkit: the first use retries
            print(f"{name}: not built ({e}); it will compile on first use")
            continue
        print(f"{builder.absolute_name()}: ready ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
