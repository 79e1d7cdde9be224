"""Old vs new full-ranking evaluator on short real runs: every evaluation of an MF run on ML-100K and of a
SASRec run on Office computes the metrics twice, through the materialised [users, items] scores
(``streaming=False``, the evaluator before fastrecloss.ranking) and through ``fastrecloss.ranking``
(``streaming=True``, the default now), and records whether the two dicts are equal.

    .venv/bin/python scripts/ranking_eval_check.py [--data ../shared/data] [--mf-epochs 3] [--sasrec-epochs 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fastrecloss.recsys import cvae_train, mf_train

CHECKS: list[dict] = []


def _compare(name: str, old_fn, new_fn) -> dict[str, float]:
    t0 = time.perf_counter()
    old = old_fn()
    t1 = time.perf_counter()
    new = new_fn()
    t2 = time.perf_counter()
    diff = max(abs(old[k] - new[k]) for k in old)
    CHECKS.append({"run": name, "equal": old == new, "max_abs_diff": diff, "old_s": round(t1 - t0, 3),
                   "new_s": round(t2 - t1, 3), "ndcg@20": new.get("ndcg@20")})
    print(json.dumps(CHECKS[-1]), flush=True)
    return new


def check_mf(data: Path, epochs: int) -> None:
    evaluate = mf_train.evaluate

    def both(model, targets, history, ks, streaming=True):
        return _compare("mf ml-100k", lambda: evaluate(model, targets, history, ks, streaming=False),
                        lambda: evaluate(model, targets, history, ks, streaming=True))

    mf_train.evaluate = both
    try:
        cfg = mf_train.MFConfig(data=str(data / "ml-100k" / "ml-100k.inter"), epochs=epochs, progress=False,
                                ks=(10, 20))
        mf_train.train_mf(cfg)
    finally:
        mf_train.evaluate = evaluate


def check_sasrec(data: Path, epochs: int) -> None:
    evaluator = cvae_train.evaluator

    def both(*args, **kwargs):
        old, new = evaluator(*args, **kwargs, streaming=False), evaluator(*args, **kwargs, streaming=True)
        return lambda: _compare("sasrec office", old, new)

    cvae_train.evaluator = both
    parser = argparse.ArgumentParser()
    cvae_train.add_arguments(parser, "sasrec")
    with tempfile.TemporaryDirectory() as out:
        args = parser.parse_args(["--data", str(data / "amazon" / "Office_Products.txt"), "--epochs", str(epochs),
                                  "--out", out, "--no-progress", "--device", "cpu"])
        try:
            cvae_train.run(args)
        finally:
            cvae_train.evaluator = evaluator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--mf-epochs", type=int, default=3)
    parser.add_argument("--sasrec-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_mf(args.data, args.mf_epochs)
    check_sasrec(args.data, args.sasrec_epochs)
    print(f"{sum(c['equal'] for c in CHECKS)} of {len(CHECKS)} evaluations equal")
    return 0 if all(c["equal"] for c in CHECKS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
