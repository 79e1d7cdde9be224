"""Sparse vs dense item-table gradient: one training step (indexed InfoNCE loss, backward, optimizer step) on
CPU, ``table_grad="dense"`` with ``torch.optim.Adam`` against ``table_grad="sparse"`` with
``torch.optim.SparseAdam``. Each method runs in a fresh process: one warm-up step (the optimizer state
exists afterwards), then ``--steps`` timed steps; memory = peak resident set above the state after the
warm-up, as :mod:`fastrecloss.benchmark.harness` measures it.

    python -m fastrecloss.benchmark.sparse_grad --out docs/benchmarks/sparse_grad
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .harness import timed_peak
from .ranking import collect

METHODS = ("dense", "sparse")


def measure(method: str, R: int, n_items: int, d: int, n_neg: int, steps: int, threads: int) -> dict:
    from ..functional import infonce

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    table = torch.nn.Parameter(torch.randn(n_items, d, generator=g) * 0.1)
    query = torch.nn.Parameter(torch.randn(R, d, generator=g) * 0.1)
    opt_cls = torch.optim.SparseAdam if method == "sparse" else torch.optim.Adam
    opt, opt_q = opt_cls([table], lr=1e-3), torch.optim.Adam([query], lr=1e-3)

    def step() -> None:
        neg_idx = torch.randint(0, n_items, (R, n_neg), generator=g)
        pos_idx = torch.randint(0, n_items, (R,), generator=g)
        loss = infonce(query, None, table, neg_idx=neg_idx, pos_idx=pos_idx, table_grad=method, backend="torch")
        opt.zero_grad(set_to_none=True)
        opt_q.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        opt_q.step()

    step()  # warm-up: the optimizer state is allocated here
    secs, peak = timed_peak(lambda: [step() for _ in range(steps)])
    secs /= steps
    return {"method": method, "R": R, "I": n_items, "d": d, "N": n_neg, "step_seconds": round(secs, 3),
            "peak_extra_mib": round(peak, 1), "threads": threads, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(**json.loads(args.one))))
        return 0
    collect("fastrecloss.benchmark.sparse_grad", [dict(method=m, R=args.rows, n_items=args.items, d=args.dim,
            n_neg=args.negatives, steps=args.steps, threads=args.threads) for m in METHODS], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
