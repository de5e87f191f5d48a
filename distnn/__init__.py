"""distnn: distributed training of image classifiers with PyTorch."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["fit"]


def __getattr__(name: str) -> Any:
    # `import distnn` stays light for the command-line tools; fit brings the trainer along.
    if name == "fit":
        from distnn.api import fit

        return fit
    raise AttributeError(f"module 'distnn' has no attribute {name!r}")
