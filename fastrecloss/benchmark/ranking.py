"""Full-ranking evaluation: time and peak extra memory of fastrecloss.ranking against the materialising
paths, on CPU (each method in a fresh process; memory = peak resident set above the inputs, as
:mod:`fastrecloss.benchmark.harness` measures it).

The task: R users (one held-out target each, a history of H items excluded), a catalogue of I items,
d-dimensional dot-product scores. Methods:

* ``rank-torch``: :func:`fastrecloss.ranking.target_rank` (torch backend), the whole batch in one call;
* ``topk-torch``: :func:`fastrecloss.ranking.topk` with k = 20, likewise;
* ``materialise-ours``: what ``recsys.metrics.full_ranking`` did before (and still does with a
  ``score_fn``): [B, I] scores per user chunk, history set to −inf, the target's rank by comparison;
* ``materialise-recbole``: RecBole's full-sort evaluation: [B, I] scores per chunk, history −inf,
  ``torch.topk(K)`` and a hit lookup.

    python -m fastrecloss.benchmark.ranking --out docs/benchmarks/ranking
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .harness import timed_peak

METHODS = ("rank-torch", "topk-torch", "materialise-ours", "materialise-recbole")


def make_inputs(R: int, n_items: int, d: int, history: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"query": torch.randn(R, d, generator=g), "table": torch.randn(n_items, d, generator=g),
            "target": torch.randint(0, n_items, (R,), generator=g),
            "indptr": torch.arange(0, (R + 1) * history, history, dtype=torch.int64),
            "indices": torch.randint(0, n_items, (R * history,), generator=g)}


def run_method(method: str, x: dict[str, torch.Tensor], chunk: int, k: int = 20) -> torch.Tensor:
    from ..ranking import target_rank, topk

    exclude = (x["indptr"], x["indices"])
    if method == "rank-torch":
        return target_rank(x["query"], x["table"], x["target"], exclude=exclude, ties="index", backend="torch")
    if method == "topk-torch":
        return topk(x["query"], x["table"], k, exclude=exclude, backend="torch")[1]
    R, n_items = x["query"].shape[0], x["table"].shape[0]
    hist = x["indices"].view(R, -1)
    out = []
    for r0 in range(0, R, chunk):
        scores = x["query"][r0 : r0 + chunk] @ x["table"].T  # [B, I]
        rows = torch.arange(scores.shape[0]).unsqueeze(1).expand_as(hist[r0 : r0 + chunk])
        scores[rows, hist[r0 : r0 + chunk]] = -torch.inf
        target = x["target"][r0 : r0 + chunk].unsqueeze(1)
        if method == "materialise-ours":
            s_t = scores.gather(1, target)
            ahead = (scores > s_t) | ((scores == s_t) & (torch.arange(n_items) < target))
            out.append(ahead.sum(dim=1))
        else:
            top = torch.topk(scores, k, dim=1).indices
            out.append((top == target).any(dim=1))
    return torch.cat(out)


def measure(method: str, R: int, n_items: int, d: int, history: int, chunk: int) -> dict:
    x = make_inputs(R, n_items, d, history)
    secs, peak = timed_peak(lambda: run_method(method, x, chunk))
    return {"method": method, "R": R, "I": n_items, "d": d, "history": history,
            "chunk": chunk if method.startswith("materialise") else None, "seconds": round(secs, 2),
            "peak_extra_mib": round(peak, 1), "threads": torch.get_num_threads()}


def run_isolated(module: str, spec: dict) -> dict:
    """``python -m module --one SPEC`` in a fresh process (freed memory goes back to the OS): its JSON row."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    proc = subprocess.run([sys.executable, "-m", module, "--one", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        return {**spec, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def collect(module: str, specs: list[dict], out: Path | None) -> list[dict]:
    """Each spec measured by :func:`run_isolated`, printed as a JSON line and written to OUT/results.csv."""
    rows = []
    for spec in specs:
        rows.append(run_isolated(module, spec))
        print(json.dumps(rows[-1]), flush=True)
    if out is None:
        return rows
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256], help="user chunks of the materialising paths")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one is not None:
        spec = json.loads(args.one)
        torch.set_num_threads(spec.pop("threads"))
        print(json.dumps(measure(**spec)))
        return 0
    specs = [dict(method=method, R=args.rows, n_items=args.items, d=args.dim, history=args.history, chunk=chunk,
                  threads=args.threads)
             for method in args.methods for chunk in (args.chunks if method.startswith("materialise") else [None])]
    collect("fastrecloss.benchmark.ranking", specs, args.out)
    return 0

if __name__ == "__main__":
    sys.exit(main())
