"""Models: `build(name, num_classes, image_size, kwargs)` for the zoo, `tv:`, `timm:` and
`pkg.module:callable` names; `prepare` (models/prepare.py) readies one for a run."""

from distnn.models.factory import build, build_named, from_callable, torchvision_names
from distnn.models.prepare import ModelArg, prepare
from distnn.models.zoo import names, register

__all__ = ["ModelArg", "build", "build_named", "from_callable", "names", "prepare", "register",
           "torchvision_names"]  # fmt: skip
