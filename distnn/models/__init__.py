"""Model zoo: `build(name, num_classes, image_size)` for registered names and `tv:<name>`."""

from distnn.models.zoo import build, names, register

__all__ = ["build", "names", "register"]
