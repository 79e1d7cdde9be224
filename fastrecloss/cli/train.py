"""``fastrecloss train MODEL ...``: routes to the model's training module."""

from __future__ import annotations

import argparse
import importlib

MODELS = {
    "mf": "fastrecloss.recsys.mf_train",
    "contrastvae": "fastrecloss.recsys.cvae_train",
    "sasrec": "fastrecloss.recsys.cvae_train",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model", required=True)
    for name, module in MODELS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name), name)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(MODELS[args.model]).run(args) or 0)
