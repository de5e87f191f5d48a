"""distnn: distributed training of image classifiers with PyTorch."""

__version__ = "0.1.0"
