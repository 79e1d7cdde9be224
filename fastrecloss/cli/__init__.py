"""The ``fastrecloss`` console command, the top of the tree.

Each subcommand lives in its own module here (``demo``, ``train``, ``bench``, ``kernels``) that
defines ``add_arguments(parser)`` and ``run(args) -> int``; this file only routes to them and
imports them lazily. The CLI may import anything in the package; nothing imports the CLI.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("fastrecloss.cli.demo", "every loss on every backend: agreement, time and memory"),
    "train": ("fastrecloss.cli.train", "train a reference model (mf, contrastvae, sasrec)"),
    "bench": ("fastrecloss.cli.bench", "benchmark the backends against the peers"),
    "kernels": ("fastrecloss.cli.kernels", "compile every Triton kernel ahead of time for sm_80/sm_90"),
}


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost (sub)parser that ``args`` went through, e.g. ``fastrecloss train mf``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _chosen_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrecloss", description="Fused recommendation losses for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        if name == chosen:  # import only the module that runs
            importlib.import_module(module).add_arguments(cmd)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand that was given them, with its usage line
        _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
