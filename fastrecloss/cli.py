"""The ``fastrecloss`` console command: ``demo`` (and later ``train``, ``bench``, ``kernels``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrecloss", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="every loss on every backend: agreement, time and memory")
    demo.add_argument("--quick", action="store_true", help="smaller sizes (for tests)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(quick=args.quick)
    return 2


if __name__ == "__main__":
    sys.exit(main())
