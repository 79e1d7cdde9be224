"""``fastrecloss train mf``: matrix factorisation with any loss, layout, sampler and backend.

    fastrecloss train mf --data ../shared/data/ml-100k/ml-100k.inter --min-rating 4 --loss mine_plus

``--data`` takes a sequence file (``user item item …``), a RecBole ``.inter`` file, a MovieLens
``u.data`` / ``ratings.dat`` file (format detected from the file), ``ml-100k`` / ``ml-1m`` (with
``--download``: fetched from files.grouplens.org into ``--data-dir``), or ``synthetic`` (the
embedded default). Results (config, per-epoch history, best validation and test metrics) go to
``OUT/results.json``; a checkpoint is written to ``OUT/checkpoint.pt`` after every epoch and
``--resume`` continues from it. Under ``torchrun --nproc_per_node N -m fastrecloss train mf
--dist gather|shard`` the run is spread over N ranks with the same metrics as one process
(:mod:`fastrecloss.recsys.mf_dist`, docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..functional import BACKENDS
from .data import (
    DataError,
    Interactions,
    Split,
    download_movielens,
    leave_one_out_by_time,
    load_interactions,
    ratio_split,
    synthetic,
)
from .metrics import check_ks, full_ranking, streaming_full_ranking
from .mf_dist import DIST_MODES, DistributedMF, world_from_env
from .models.mf import LOSSES, MF, MFBatch, check_loss, resolve_layout
from .sampling import SAMPLERS, NegativeSampler, UserItemSet
from .training import PeakMemory, fit, progress, seed_everything, write_json

HPARAMS = ("lam", "eps", "beta", "margin", "neg_weight")
RESUMABLE = ("epochs", "patience", "resume", "progress", "out")  # may change when resuming
DEMO_SYNTHETIC = {"num_users": 2000, "num_items": 2000, "per_user": 20}


@dataclass
class MFConfig:
    data: str = "synthetic"
    format: str = "auto"
    min_rating: float | None = None
    split: str = "ratio"  # ratio (per-user random 80/10/10) | loo (leave-one-out by time)
    download: bool = False
    data_dir: str = "~/.cache/fastrecloss"
    loss: str = "mine_plus"
    lam: float | None = None
    eps: float | None = None
    beta: float | None = None
    margin: float | None = None
    neg_weight: float | None = None
    temperature: float = 1.0
    negatives: int = 256
    sampler: str = "uniform"
    layout: str = "auto"
    logq: bool = False
    exclude_positives: bool = False
    normalize: bool | None = None  # None: cosine scores for ccl only
    backend: str = "auto"
    epochs: int = 30
    batch_size: int = 1024
    dim: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.0
    seed: int = 0
    patience: int = 5
    metric: str = "ndcg@20"
    ks: tuple[int, ...] = (20,)
    eval_every: int = 1
    out: str | None = None
    resume: bool = False
    progress: bool = True
    deterministic: bool = False
    dist: str = "gather"  # under torchrun: gather (rows split, negatives gathered) | shard (item table sharded)

    def hparams(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in HPARAMS if getattr(self, k) is not None}


# ----------------------------------------------------------------------------------------------
# data


def load_split(cfg: MFConfig) -> tuple[Split, str]:
    """Load ``cfg.data`` and split it; returns the split and a one-line description."""
    if cfg.split not in ("ratio", "loo"):
        raise ValueError(f"--split must be 'ratio' or 'loo', got {cfg.split!r}")
    if cfg.data == "synthetic":
        inter = synthetic(seed=cfg.seed)
        source = "synthetic (seeded planted low-rank structure)"
    else:
        path = Path(cfg.data)
        if cfg.data in ("ml-100k", "ml-1m") and not path.exists():
            if not cfg.download:
                raise DataError(f"{cfg.data}: no such file; pass --download to fetch it from files.grouplens.org")
            path = download_movielens(cfg.data, Path(cfg.data_dir).expanduser())
        inter = load_interactions(path, cfg.format, min_rating=cfg.min_rating)
        source = str(path) + (f" (rating >= {cfg.min_rating})" if cfg.min_rating is not None else "")
    split = ratio_split(inter, (0.8, 0.1, 0.1), seed=cfg.seed) if cfg.split == "ratio" else leave_one_out_by_time(inter)
    desc = (f"{source}: {inter.num_users} users, {inter.num_items} items, {len(inter)} interactions; "
            f"split {cfg.split}: train {len(split.train)}, valid {len(split.valid)}, test {len(split.test)}")
    return split, desc


def _per_user(inter: Interactions, *others: Interactions) -> list[list[int]]:
    lists = inter.user_items()
    for other in others:
        for u, items in enumerate(other.user_items()):
            lists[u].extend(items)
    return lists


def evaluate(model: MF, targets: Interactions, history: list[list[int]], ks: tuple[int, ...],
             streaming: bool = True) -> dict[str, float]:
    """Full-ranking metrics; ``streaming`` ranks with fastrecloss.ranking (no [users, items] scores),
    else through the materialised scores (the same numbers, see recsys.metrics)."""
    users = list(range(model.user.num_embeddings))
    if streaming:
        return streaming_full_ranking(model.user_vectors, model.item_table(), users, targets.user_items(), history,
                                      ks=ks, chunk_size=1024)
    return full_ranking(model.score, users, targets.user_items(), history, ks=ks, chunk_size=1024)


# ----------------------------------------------------------------------------------------------
# training


def train_mf(cfg: MFConfig, split: Split | None = None, log: Any = None) -> dict[str, Any]:
    """Train MF as configured; returns the results dict (also written to ``cfg.out``/results.json)."""
    check_loss(cfg.loss, cfg.hparams())
    if cfg.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {cfg.sampler!r}")
    layout = resolve_layout(cfg.loss, cfg.layout, cfg.sampler)
    for name in ("negatives", "batch_size", "dim"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0, got {cfg.temperature}")
    if cfg.metric.split("@")[0] not in ("recall", "ndcg", "hit", "mrr") or "@" not in cfg.metric:
        raise ValueError(f"--metric must look like ndcg@20 (recall|ndcg|hit|mrr @ K), got {cfg.metric!r}")
    ks = tuple(sorted({*cfg.ks, int(cfg.metric.split("@")[1])}))
    t_start = time.perf_counter()
    desc = "given split"
    if split is None:
        split, desc = load_split(cfg)
    train, valid, test = split
    check_ks(ks, train.num_items)
    ddp = DistributedMF(cfg.dist, cfg.loss, layout) if world_from_env() > 1 else None
    if ddp is not None and cfg.resume:
        raise ValueError("--resume is not supported under torchrun (no checkpoints are written there)")
    lead = ddp is None or ddp.rank == 0
    gen = seed_everything(cfg.seed)
    sampler_gen = torch.Generator().manual_seed(cfg.seed + 1)
    normalize = cfg.loss == "ccl" if cfg.normalize is None else cfg.normalize
    model = MF(train.num_users, train.num_items, cfg.dim, normalize=normalize)
    params = ddp.attach(model) if ddp is not None else model.parameters()
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    counts = train.item_counts()
    sampler = None
    if cfg.sampler != "in-batch":
        sampler = NegativeSampler(train.num_items, cfg.sampler, counts if cfg.sampler == "popularity" else None,
                                  generator=sampler_gen)
    exclude = UserItemSet(train.users, train.items, train.num_items) if cfg.exclude_positives else None
    users_t = torch.as_tensor(train.users)
    items_t = torch.as_tensor(train.items)
    train_hist = _per_user(train)

    def train_epoch(epoch: int) -> dict[str, float]:
        perm = torch.randperm(len(train), generator=gen)
        total, batches = 0.0, 0
        steps = range(0, len(train), cfg.batch_size)
        kw = dict(temperature=cfg.temperature, hparams=cfg.hparams(), backend=cfg.backend,
                  deterministic=cfg.deterministic)
        for start in progress(steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.progress and lead):
            idx = perm[start:start + cfg.batch_size]
            batch = MFBatch(users_t[idx], items_t[idx])
            if ddp is None:
                loss = model.loss(batch, cfg.loss, layout, sampler=sampler, num_negatives=cfg.negatives,
                                  log_q_correction=cfg.logq, exclude=exclude, item_counts=counts, **kw)
            else:
                loss = ddp.loss(batch, sampler=sampler, num_negatives=cfg.negatives, log_q_correction=cfg.logq,
                                exclude=exclude, item_counts=counts, kw=kw)
            value = float(loss.detach()) if ddp is None else ddp.total(loss)
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite loss {value} at epoch {epoch + 1}; lower --lr or "
                                         "raise --temperature")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if ddp is not None:
                ddp.sync_grads()
            optimizer.step()
            total += value
            batches += 1
        return {"loss": total / max(batches, 1)}

    def validate() -> dict[str, float]:
        run = lambda: evaluate(model, valid, train_hist, ks)  # noqa: E731
        return run() if ddp is None else ddp.evaluate(run)

    result = fit(model, optimizer, train_epoch=train_epoch, evaluate=validate, epochs=cfg.epochs, metric=cfg.metric,
                 patience=cfg.patience, generators={"shuffle": gen, "sampler": sampler_gen},
                 out_dir=cfg.out if ddp is None else None, resume=cfg.resume, eval_every=cfg.eval_every,
                 log=log if lead else None, fingerprint={k: v for k, v in asdict(cfg).items() if k not in RESUMABLE})
    model.eval()
    run_test = lambda: evaluate(model, test, _per_user(train, valid), ks)  # noqa: E731
    test_metrics = run_test() if ddp is None else ddp.evaluate(run_test, gather_table=False)
    secs = [h["train_seconds"] for h in result.history]
    results = {
        "model": "mf", "config": {**asdict(cfg), "layout_resolved": layout, "normalize_resolved": normalize},
        "data": desc, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early, "resumed_from_epoch": result.resumed_from,
        "valid": result.best_valid, "test": test_metrics,
        "seconds_per_epoch": float(np.mean(secs)) if secs else None,
        "total_seconds": time.perf_counter() - t_start, "history": result.history,
        "world_size": 1 if ddp is None else ddp.world,
    }
    if cfg.out is not None and lead:
        write_json(Path(cfg.out) / "results.json", results)
    if ddp is not None:
        ddp.close()
    return results


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser, model_name: str = "mf") -> None:
    d = MFConfig()
    parser.description = f"Train {model_name.upper()} (matrix factorisation) with a fastrecloss loss."
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="file (sequence txt, .inter, u.data, ratings.dat), ml-100k/ml-1m "
                   "(with --download) or 'synthetic' (default)")
    g.add_argument("--format", default=d.format, help="auto (default), sequence, inter, u.data, ratings.dat")
    g.add_argument("--min-rating", type=float, default=d.min_rating, help="keep ratings >= this (implicit feedback)")
    g.add_argument("--split", default=d.split, help="ratio: per-user random 80/10/10 (default); loo: leave-one-out "
                   "by time")
    g.add_argument("--download", action="store_true", help="fetch ml-100k / ml-1m from files.grouplens.org")
    g.add_argument("--data-dir", default=d.data_dir, help="where --download stores data (default %(default)s)")
    g = parser.add_argument_group("loss")
    g.add_argument("--loss", default=d.loss, help=f"one of {', '.join(LOSSES)} (default %(default)s)")
    for name in HPARAMS:
        g.add_argument(f"--{name.replace('_', '-')}", type=float, default=None, help=f"{name} (loss default)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="τ (default %(default)s)")
    g.add_argument("--negatives", type=int, default=d.negatives, help="negatives per row / pool size")
    g.add_argument("--sampler", default=d.sampler, help="uniform (default), popularity or in-batch")
    g.add_argument("--layout", default=d.layout, help="auto (default), shared, per_row, indexed, in_batch, full")
    g.add_argument("--logq", action="store_true", help="apply the sampler's logQ correction")
    g.add_argument("--exclude-positives", action="store_true", help="keep users' training items out of negatives")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="cosine scores (default: on for ccl only)")
    g.add_argument("--backend", default=d.backend, help="auto (default), reference, torch, triton")
    g.add_argument("--deterministic", action="store_true", help="bit-identical item gradients")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--dim", type=int, default=d.dim)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--patience", type=int, default=d.patience, help="evaluations without improvement before stopping")
    g.add_argument("--metric", default=d.metric, help="validation metric for early stopping (default %(default)s)")
    g.add_argument("--ks", type=int, nargs="+", default=list(d.ks), help="cut-offs K reported (default 20)")
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--out", default=None, help="directory for results.json and checkpoint.pt")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--dist", default=d.dist, choices=DIST_MODES, help="under torchrun: gather (the global batch "
                   "split across ranks, negatives gathered) or shard (the item table sharded by rows); "
                   "docs/distributed.md")


def config_from_args(args: argparse.Namespace) -> MFConfig:
    names = {f.name for f in fields(MFConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["ks"] = tuple(values.get("ks", (20,)))
    return MFConfig(**values)


def _summary(results: dict[str, Any]) -> str:
    fmt = lambda m: ", ".join(f"{k} {v:.4f}" for k, v in m.items())
    return (f"best epoch {results['best_epoch']}/{results['epochs_run']} run; valid: {fmt(results['valid'])}\n"
            f"test: {fmt(results['test'])}\n{results['seconds_per_epoch']:.2f} s/epoch, "
            f"{results['total_seconds']:.1f} s total")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        if cfg.resume and cfg.out is None:
            raise ValueError("--resume needs --out DIR (where the checkpoint is)")
        log = (lambda s: print(s, file=sys.stderr)) if cfg.progress else None
        results = train_mf(cfg, log=log)
    except (ValueError, OSError, FloatingPointError) as e:  # DataError is a ValueError
        print(f"fastrecloss train mf: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    print(results["data"])
    print(_summary(results))
    if cfg.out is not None:
        print(f"results: {Path(cfg.out) / 'results.json'}")
    return 0


# ----------------------------------------------------------------------------------------------
# demo: reference vs torch backend


def demo_config(backend: str, quick: bool) -> MFConfig:
    return MFConfig(loss="softmax_ce", layout="full", backend=backend, epochs=2 if quick else 4, dim=64,
                    batch_size=2048, lr=3e-2, temperature=1.0, seed=0, patience=100, progress=False)


def _demo_case(backend: str, quick: bool) -> dict[str, Any]:
    """One backend's brief run (meant to run in its own process so its peak memory is its own)."""
    torch.set_num_threads(1)
    cfg = demo_config(backend, quick)
    inter = synthetic(**DEMO_SYNTHETIC, seed=cfg.seed)
    split = ratio_split(inter, (0.8, 0.1, 0.1), seed=cfg.seed)
    # Warm up (one step on a throwaway model): the first call loads kernels and libraries, which
    # would otherwise dominate the peak memory of a run this short.
    warm = MF(split.train.num_users, split.train.num_items, cfg.dim)
    rows = torch.arange(cfg.batch_size) % split.train.num_users
    warm.loss(MFBatch(rows, rows % split.train.num_items), cfg.loss, "full", temperature=cfg.temperature,
              backend=backend).backward()
    del warm
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        res = train_mf(cfg, split=split)
        seconds = time.perf_counter() - t0
    return {"backend": backend, "test": res["test"], "seconds": seconds, "s_per_epoch": res["seconds_per_epoch"],
            "peak_rss_bytes": mem.peak, "epochs": res["epochs_run"]}


def demo_comparison(quick: bool = False) -> str:
    """Train MF briefly on synthetic data with the reference and the torch backend (same seed, one
    process each) and return a table of their test metrics, time and peak RSS growth."""
    rows = []
    for backend in ("reference", "torch"):
        code = ("import json, sys; from fastrecloss.recsys.mf_train import _demo_case; "
                f"print(json.dumps(_demo_case({backend!r}, {quick!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            return f"MF demo: the {backend} run failed: {tail[0]}"
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cfg = demo_config("torch", quick)
    syn = DEMO_SYNTHETIC
    lines = [f"MF on synthetic data ({syn['num_users']} users x {syn['num_items']} items, {syn['per_user']} per user), "
             f"{cfg.loss} over the full catalogue, batch {cfg.batch_size}, d={cfg.dim}, {rows[0]['epochs']} epochs, "
             "seed 0, 1 thread:",
             f"  {'backend':<10} {'recall@20':>9} {'ndcg@20':>9} {'s/epoch':>8} {'peak RSS growth':>16}"]
    for r in rows:
        mem = "n/a" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / 2**20:.1f} MiB"
        lines.append(f"  {r['backend']:<10} {r['test']['recall@20']:>9.4f} {r['test']['ndcg@20']:>9.4f} "
                     f"{r['s_per_epoch']:>8.2f} {mem:>16}")
    diff = max(abs(rows[0]["test"][k] - rows[1]["test"][k]) for k in rows[0]["test"])
    lines.append(f"  max |metric difference| = {diff:.2e}; peak RSS growth = VmHWM - VmRSS over the training call "
                 "(after a warm-up step), each backend in its own process")
    if any(math.isnan(v) for r in rows for v in r["test"].values()):
        lines.append("  warning: NaN metric")
    return "\n".join(lines)
