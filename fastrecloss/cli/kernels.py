"""``fastrecloss kernels``: compile every Triton kernel × launch configuration ahead of time.

No GPU is needed: each kernel is compiled for sm_80 and sm_90 with ``triton.compile`` and an
explicit ``GPUTarget``, and the registers, spills (STACK/LOCAL bytes) and shared memory of every
cubin are printed (see ``fastrecloss/backends/triton_aot.py``). Exits with status 1 when any configuration spills.
With ``--sass``, each cubin is also disassembled and its steady-state loop's instructions per score
are printed by class, with the implied cycles per 1,000 scores (``fastrecloss/backends/triton_sass.py``).
"""

from __future__ import annotations

import argparse
import os

from ..backends import triton_aot as aot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kinds", nargs="+", default=sorted(aot.KINDS), choices=sorted(aot.KINDS),
                        help="loss kinds to specialise the kernels for (default: all)")
    parser.add_argument("--archs", nargs="+", type=int, default=list(aot.ARCHS),
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="parallel compiler processes")
    parser.add_argument("--sass", action="store_true",
                        help="static cost report: per-score instructions of each kernel's steady-state loop by class")


def run(args: argparse.Namespace) -> int:
    sass = getattr(args, "sass", False)
    results = aot.run_isolated(tuple(args.kinds), tuple(args.archs), args.workers, progress=True, sass=sass)
    print(aot.format_table(results))
    if sass:
        from ..backends.triton_sass import format_table as sass_table

        print("\nSteady-state loop, instructions per score element by class (per thread) (static count):\n")
        print(sass_table([r.__dict__ for r in results if r.sass]))
    spilled = [r for r in results if r.spills]
    worst = max(results, key=lambda r: r.regs)
    print(f"\n{len(results)} compilations ({len({(r.kernel, r.variant) for r in results})} kernel variants × "
          f"{len(args.archs)} archs); most registers: {worst.regs} ({worst.kernel}, {worst.variant}, {worst.arch}); "
          f"{len(spilled)} with spills")
    for r in spilled:
        print(f"  SPILL {r.stack + r.local} B: {r.kernel} {r.variant} {r.arch}")
    return 1 if spilled else 0
