"""`python -m distnn.models [list]`: the model names; `python -m distnn.models summary NAME`:
a model's layers, parameters and FLOPs per image."""

from __future__ import annotations

import argparse
from typing import Any

import torch
import yaml

from distnn.errors import UserError, cli
from distnn.models import build, names
from distnn.models.summary import profile, table

FAMILIES = [
    "tv:<name>            any torchvision classifier, e.g. tv:efficientnet_b0",
    "timm:<name>          any timm model, e.g. timm:convnext_atto (never downloads weights)",
    "pkg.module:callable  your own: a callable returning an nn.Module, found on PYTHONPATH",
]


def list_models(args: argparse.Namespace) -> None:
    print("\n".join([*names(), *FAMILIES]))


def summary(args: argparse.Namespace) -> None:
    model = build(args.name, args.num_classes, args.image_size, parse_kwargs(args.kwargs))
    print(table(model, args.image_size, depth=args.depth))
    print(profile(model, args.image_size, args.num_classes, torch.device("cpu")).describe())


def parse_kwargs(items: list[str]) -> dict[str, Any]:
    """`k=v` strings to a dict, each v a YAML scalar (width=4 is an int, scale=0.5 a float)."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--kwargs takes key=value, got {item!r}")
        try:
            kwargs[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--kwargs {item!r}: not a YAML value ({e.problem})") from None
    return kwargs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distnn.models", description=__doc__)
    p.set_defaults(run=list_models)
    sub = p.add_subparsers(title="commands")
    sub.add_parser("list", help="model names (the default)").set_defaults(run=list_models)
    s = sub.add_parser("summary", help="layers, parameters and FLOPs of one model")
    s.set_defaults(run=summary)
    s.add_argument("name", help="a name `list` shows, or tv:/timm:/pkg.module:callable")
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--num-classes", type=int, default=10)
    s.add_argument("--depth", type=int, default=3, help="layer nesting the table shows")
    s.add_argument("--kwargs", nargs="*", default=[], metavar="K=V", help="builder kwargs")
    return p


@cli
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
