#!/usr/bin/env python3
"""Interleaved A/B of the demo's / acceptance suite's cases across source trees (README, Performance:
"Threads on a busy machine").

Each measurement is the harness's own fresh-process run (``python -m fastrecloss.benchmark.harness``,
warm-up, then ``--repeats`` timed calls; peak extra memory as ``measure_isolated`` measures it) with
``PYTHONPATH`` set to one tree, so an old checkout (``git archive REV | tar -x -C DIR``) and this one
run side by side: variant 1, 2, …, variant 1, 2, … for ``--rounds`` rounds. Prints every run, then per
case the median [range] of the time and of each variant's pairwise ratio to the first variant.

    python scripts/ab_trees.py --cases indexed,acc_indexed --threads 1 \\
        ref=/tmp/old:reference before=/tmp/old:torch after=.:torch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from fastrecloss.benchmark.harness import Case

CASES = {  # the demo's three (half the acceptance size), the acceptance indexed case, a per-row one
    "catalogue": Case("softmax_ce", "catalogue", rows=2048, n=25_000),
    "shared": Case("infonce_plus", "shared", rows=2048, n=8_192),
    "indexed": Case("mine_plus", "indexed", rows=2048, n=256, items=50_000),
    "acc_indexed": Case("mine_plus", "indexed", rows=4096, n=256, items=100_000),
    "per_row": Case("mine_plus", "per_row", rows=2048, n=128),
}


def run_one(case: Case, tree: Path, impl: str, threads: int, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()), MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    if threads:  # through the environment: an old tree's harness may not take ``threads``
        env["OMP_NUM_THREADS"] = str(threads)
    payload = json.dumps({"case": asdict(case), "impl": impl, "kw": {"repeats": repeats}})
    proc = subprocess.run([sys.executable, "-m", "fastrecloss.benchmark.harness", payload], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{tree}:{impl} on {case.label} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="LABEL=TREE:IMPL; the first is the ratios' denominator")
    parser.add_argument("--cases", default="indexed", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per run (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per run (the demo's 2)")
    args = parser.parse_args()
    variants = [(label, *spec.rsplit(":", 1)) for label, spec in (v.split("=", 1) for v in args.variants)]
    cases = args.cases.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(args.rounds):
        for name in cases:
            for label, tree, impl in variants:
                out = run_one(CASES[name], Path(tree), impl, args.threads, args.repeats)
                runs.setdefault((name, label), []).append(out)
                print(f"{rnd} {name} {label}: {out['time_ms']:.0f} ms, {out['peak_extra_mib']:.1f} MiB", flush=True)
    for name in cases:
        base = runs[(name, variants[0][0])]
        base_mem = statistics.median(r["peak_extra_mib"] for r in base)
        for label, _, _ in variants:
            t = [r["time_ms"] for r in runs[(name, label)]]
            ratio = [a / b["time_ms"] for a, b in zip(t, base)]
            mem = statistics.median(r["peak_extra_mib"] for r in runs[(name, label)])
            print(f"{name:<12} {label:<10} {statistics.median(t):8.0f} ms [{min(t):.0f}-{max(t):.0f}]  "
                  f"{statistics.median(ratio):.2f}x [{min(ratio):.2f}-{max(ratio):.2f}]  "
                  f"{mem:.1f} MiB ({mem / max(base_mem, 1e-9):.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
