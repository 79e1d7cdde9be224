"""``fastrecloss train contrastvae|sasrec``: sequential recommendation on fastrecloss losses.

    fastrecloss train contrastvae --data ../shared/data/amazon/Office_Products.txt --max-minutes 85
    fastrecloss train contrastvae --data ../shared/data/amazon/Office_Products.txt --resume
    fastrecloss train sasrec --data ../shared/data/amazon/Beauty.txt

Protocol (SPEC §10): leave-one-out (valid = second-to-last item, test = last), full ranking over
the catalogue with the history masked with −inf, early stopping on a validation metric; the test
metrics are those of the best validation epoch. ``--data synthetic`` (the default) runs on a small
seeded synthetic data set. ``--preset`` (default: from the file name) fills in the paper's
per-data-set settings; any flag given explicitly wins. Results go to ``OUT/results.json``; a
checkpoint is written after every epoch and ``--resume`` continues from it, giving the same result
as an uninterrupted run. ``--max-minutes`` stops before an epoch that would not fit the budget
(the checkpoint stays, so a later ``--resume`` finishes the run).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..functional import BACKENDS
from .data import leave_one_out, load_sequences, synthetic, to_sequences
from .metrics import full_ranking, streaming_full_ranking
from .models.contrastvae import AUGS, KL_NORMS, PADDINGS, RECONS, ContrastVAE, EncoderConfig, recon_scale
from .models.sasrec import SASRec
from .seqdata import SequenceBatcher, eval_batch, eval_order
from .training import CHECKPOINT, fit, progress, seed_everything, write_json

# The paper's settings per data set (README of the published code); hidden 128, 1 layer, 4 heads.
PRESETS: dict[str, dict[str, Any]] = {
    "beauty": dict(aug="ma", nce_weight=0.6, hidden_dropout=0.3, attn_dropout=0.0, max_len=50, kl_cap=0.2,
                   anneal_steps=10_000, reparam_dropout=0.1),
    "office": dict(aug="va", nce_weight=0.3, hidden_dropout=0.3, attn_dropout=0.3, max_len=100, kl_cap=0.2,
                   anneal_steps=20_000),
    "tools": dict(aug="va", nce_weight=0.4, hidden_dropout=0.3, attn_dropout=0.3, max_len=100, kl_cap=0.4,
                  anneal_steps=5_000),
    "toys": dict(aug="va", nce_weight=0.3, hidden_dropout=0.3, attn_dropout=0.3, max_len=100, kl_cap=0.2,
                 anneal_steps=10_000),
}
DEFAULTS: dict[str, Any] = dict(aug="va", nce_weight=0.3, hidden_dropout=0.3, attn_dropout=0.3, max_len=100,
                                kl_cap=0.2, anneal_steps=20_000, reparam_dropout=0.1, layers=1, heads=4)
# SASRec: not tuned per data set here; the SASRec paper's recipe for sparse data (2 blocks, dropout 0.5).
SASREC_DEFAULTS: dict[str, Any] = dict(hidden_dropout=0.5, attn_dropout=0.5, layers=2, heads=4)
SYNTHETIC = {"num_users": 500, "num_items": 300, "dim": 8, "per_user": 12}


class BudgetExhausted(Exception):
    """Raised at the start of an epoch that would not fit ``--max-minutes``."""


def add_arguments(parser: argparse.ArgumentParser, model_name: str) -> None:
    if model_name not in ("contrastvae", "sasrec"):
        raise ValueError(f"model_name must be 'contrastvae' or 'sasrec', got {model_name!r}")
    parser.set_defaults(model=model_name)
    a = parser.add_argument
    a("--data", default="synthetic", help="sequence file 'user item item ...' or 'synthetic' (default)")
    a("--preset", default="auto", choices=["auto", "none", *PRESETS],
      help="the paper's per-data-set settings (auto: from the file name)")
    a("--hidden", type=int, default=128)
    a("--layers", type=int, default=None, help="transformer blocks (contrastvae 1, sasrec 2)")
    a("--heads", type=int, default=None, help="attention heads (4)")
    a("--hidden-dropout", type=float, default=None)
    a("--attn-dropout", type=float, default=None)
    a("--max-len", type=int, default=None, help="longest input kept (the last items)")
    a("--recon", default="bce", choices=RECONS,
      help="next-item loss: bce with one sampled negative per position (published) or full softmax_ce")
    if model_name == "contrastvae":
        a("--aug", default=None, choices=AUGS, help="second view: va variational, ma model (dropout), da data")
        a("--nce-weight", type=float, default=None, help="weight of the NT-Xent term")
        a("--temperature", type=float, default=0.5, help="NT-Xent temperature (cosine similarity)")
        a("--kl-cap", type=float, default=None, help="KL weight cap")
        a("--anneal-steps", type=int, default=None, help="steps of the linear KL annealing")
        a("--reparam-dropout", type=float, default=None, help="latent dropout of the ma/da second view")
        a("--kl-norm", default="maxlen", choices=KL_NORMS,
          help="maxlen: KL sum over real positions / (B·max_len), the published scale; token: mean per position")
        a("--padding", default="masked", choices=PADDINGS,
          help="masked: padding positions are invisible; published: as the published code, a padding query "
               "attends to its whole row and the batch's padding positions enter the KL and the NT-Xent sum of z")
    a("--recon-norm", default="epoch", choices=["batch", "epoch"],
      help="epoch (default): the batch's mean reconstruction loss times its real positions / the epoch's mean "
           "per batch, so every position weighs the same as with the published random batches; batch: the plain "
           "batch mean, which under length bucketing weighs a batch of short sequences like one of long ones")
    a("--lr", type=float, default=1e-3)
    a("--weight-decay", type=float, default=0.0)
    a("--batch-size", type=int, default=256)
    a("--epochs", type=int, default=400)
    a("--patience", type=int, default=50, help="evaluations without improvement before stopping")
    a("--metric", default="ndcg@20", help="validation metric for early stopping")
    a("--eval-every", type=int, default=1)
    a("--bucket-pool", type=int, default=32, help="bucket users by length within pools of this many batches")
    a("--pad-to-max-len", action="store_true",
      help="pad every batch to max_len (published) instead of to its longest sequence (slow)")
    a("--precision", default="bf16", choices=["bf16", "fp32"],
      help="bf16: transformer matmuls under bf16 autocast (fp32 weights, LayerNorm, softmax and losses)")
    a("--backend", default="auto", choices=BACKENDS, help="fastrecloss backend of every loss term")
    a("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    a("--seed", type=int, default=42)
    a("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a("--max-minutes", type=float, default=None, help="stop before an epoch that would not fit this budget")
    a("--out", default=None, help="output folder (default runs/MODEL-DATA-seedN)")
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    a("--no-progress", action="store_true", help="no progress bar")


@dataclass
class Setup:
    cfg: EncoderConfig
    model: nn.Module
    hp: dict[str, Any]


def resolve(args: argparse.Namespace, num_items: int) -> dict[str, Any]:
    """Hyper-parameters: explicit flags, else the preset, else the defaults."""
    preset = args.preset
    if preset == "auto":
        name = Path(args.data).name.lower()
        preset = next((p for p in PRESETS if name.startswith(p)), "none")
    if args.model == "contrastvae":
        base = {**DEFAULTS, **PRESETS.get(preset, {})}
    else:
        base = {**SASREC_DEFAULTS, "max_len": PRESETS.get(preset, DEFAULTS)["max_len"]}
    hp: dict[str, Any] = {"preset": preset, "num_items": num_items}
    for key, default in base.items():
        value = getattr(args, key, None)
        hp[key] = default if value is None else value
    for key in ("hidden", "recon", "lr", "weight_decay", "batch_size", "epochs", "patience", "metric",
                "eval_every", "bucket_pool", "pad_to_max_len", "precision", "backend", "seed", "temperature",
                "kl_norm", "recon_norm", "padding"):
        if hasattr(args, key):
            hp[key] = getattr(args, key)
    return hp


def build(model_name: str, hp: dict[str, Any]) -> Setup:
    cfg = EncoderConfig(num_items=hp["num_items"], hidden=hp["hidden"], layers=hp["layers"], heads=hp["heads"],
                        hidden_dropout=hp["hidden_dropout"], attn_dropout=hp["attn_dropout"], max_len=hp["max_len"],
                        mask_token=hp.get("aug") == "da")
    if model_name == "contrastvae":
        model: nn.Module = ContrastVAE(cfg, hp["aug"], reparam_dropout=hp["reparam_dropout"],
                                       padding=hp.get("padding", "masked"))
    else:
        model = SASRec(cfg)
    return Setup(cfg, model, hp)


def load_data(path: str, seed: int) -> tuple[list[list[int]], int, str]:
    if path == "synthetic":
        data = to_sequences(synthetic(**SYNTHETIC, seed=seed))
        source = f"synthetic {SYNTHETIC}"
    else:
        data = load_sequences(path)
        source = path
    return data.sequences, data.num_items, source


def autocast(model: nn.Module, precision: str) -> torch.autocast:
    """bf16 autocast on the model's device (a no-op context for fp32)."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step_fn(setup: Setup, mean_positions: float | None = None):
    """A function (batch, step) -> dict of loss terms, the total under ``'loss'``.

    ``mean_positions`` (the epoch's mean real positions per batch) is used with
    ``recon_norm='epoch'``.
    """
    model, hp = setup.model, setup.hp
    per_position = mean_positions if hp.get("recon_norm", "batch") == "epoch" else None

    def loss_terms(batch, step: int) -> dict[str, torch.Tensor]:
        scale = recon_scale(batch.valid, per_position)
        if isinstance(model, ContrastVAE):
            with autocast(model, hp["precision"]):
                out = model(batch.items, batch.valid, batch.aug_items, batch.aug_valid)
            return model.loss_terms(out, batch.targets, batch.negatives, batch.valid, step,
                                    nce_weight=hp["nce_weight"], kl_cap=hp["kl_cap"],
                                    anneal_steps=hp["anneal_steps"], temperature=hp["temperature"],
                                    recon=hp["recon"], kl_norm=hp["kl_norm"], recon_scale=scale,
                                    backend=hp["backend"])
        with autocast(model, hp["precision"]):
            hidden = model(batch.items, batch.valid)
        return model.loss_terms(hidden, batch.targets, batch.negatives, batch.valid, recon=hp["recon"],
                                recon_scale=scale, backend=hp["backend"])

    return loss_terms


def evaluator(model: nn.Module, inputs: list[list[int]], targets: list[int], max_len: int, precision: str,
              ks: tuple[int, ...] = (20, 40), chunk: int = 512, streaming: bool = True):
    """evaluate() -> metrics: full ranking, users in length order, history masked with −inf
    (``streaming``: ranked by fastrecloss.ranking without the [users, items] scores, same numbers)."""
    order = eval_order(inputs)
    cols_target = [[targets[u] - 1] for u in order]
    history = [[i - 1 for i in inputs[u]] for u in order]
    padded: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # the inputs never change: pad once

    def vectors(users: torch.Tensor) -> torch.Tensor:
        key = tuple(users.tolist())
        if key not in padded:
            padded[key] = eval_batch(inputs, [order[n] for n in key], max_len)
        items, valid = padded[key]
        device = next(model.parameters()).device
        with autocast(model, precision):
            return model.user_vectors(items.to(device), valid.to(device)).float()

    def evaluate() -> dict[str, float]:
        was = model.training
        model.eval()
        users = list(range(len(order)))
        try:
            if streaming:
                table = model.table[1:model.cfg.num_items + 1]  # column c = item c + 1, as model.scores
                return streaming_full_ranking(vectors, table, users, cols_target, history, ks=ks, chunk_size=chunk)
            return full_ranking(lambda u: model.scores(vectors(u)), users, cols_target, history, ks=ks,
                                chunk_size=chunk)
        finally:
            model.train(was)

    return evaluate


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, OSError, FloatingPointError) as e:  # DataError is a ValueError: one line, as train mf
        print(f"fastrecloss train {args.model}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    sequences, num_items, source = load_data(args.data, args.seed)
    split = leave_one_out(sequences)
    hp = resolve(args, num_items)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    setup = build(args.model, hp)
    model = setup.model.to(device)
    batcher = SequenceBatcher(split.train, num_items, hp["max_len"], hp["batch_size"], pool_batches=hp["bucket_pool"],
                              negatives=hp["recon"] == "bce", mask_id=setup.cfg.mask_id,
                              pad_to_max_len=hp["pad_to_max_len"])
    optimizer = torch.optim.Adam(model.parameters(), lr=hp["lr"], betas=(0.9, 0.999), weight_decay=hp["weight_decay"])
    data_name = "synthetic" if args.data == "synthetic" else Path(args.data).stem
    out = Path(args.out or f"runs/{args.model}-{data_name}-seed{args.seed}")
    show = not args.no_progress
    steps_per_epoch = len(batcher)
    loss_terms = train_step_fn(setup, batcher.num_targets / steps_per_epoch)
    t_start = time.perf_counter()
    budget = args.max_minutes * 60 if args.max_minutes is not None else math.inf
    previous_start: list[float] = []  # start of the previous epoch: its training + evaluation time

    def train_epoch(epoch: int) -> dict[str, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        last = t0 - previous_start[-1] if previous_start else 0.0
        if t0 - t_start + last > budget:
            raise BudgetExhausted
        previous_start.append(t0)
        sums: dict[str, float] = {}
        n = 0
        batches = progress(batcher.epoch(args.seed * 1_000_003 + epoch), desc=f"{args.model} epoch {epoch + 1}",
                           total=steps_per_epoch, enabled=show)
        for i, batch in enumerate(batches):
            terms = loss_terms(batch.to(device), epoch * steps_per_epoch + i)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n += 1
        stats = {k: v / max(n, 1) for k, v in sums.items()}
        if isinstance(model, ContrastVAE) and hp["aug"] == "va":
            stats["alpha"] = float(model.alpha.detach())
        stats["cpu_seconds"] = time.process_time() - c0  # all threads; = wall time on idle cores × threads
        return stats

    valid_eval = evaluator(model, split.valid.inputs, split.valid.targets, hp["max_len"], hp["precision"])
    test_eval = evaluator(model, split.test.inputs, split.test.targets, hp["max_len"], hp["precision"])
    eval_times: list[float] = []

    def timed_valid() -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = valid_eval()
        eval_times.append(time.perf_counter() - t0)
        return metrics

    status = "finished"
    print(f"{args.model} on {source}: {len(sequences)} users, {num_items} items, {batcher.num_targets} training "
          f"targets, {steps_per_epoch} batches/epoch; out {out}", flush=True)
    try:
        result = fit(model, optimizer, train_epoch=train_epoch, evaluate=timed_valid, epochs=hp["epochs"],
                     metric=hp["metric"], patience=hp["patience"], generators={}, out_dir=out, resume=args.resume,
                     eval_every=hp["eval_every"], log=lambda s: print(s, flush=True))
        history, best_epoch, best_valid = result.history, result.best_epoch, result.best_valid
        if result.stopped_early:
            status = "early_stopped"
    except BudgetExhausted:
        status = "budget"
        history, best_valid, best_epoch, done = [], {}, -1, 0
        if (out / CHECKPOINT).exists():
            ck = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
            model.load_state_dict(ck["best_state"])
            history, best_valid, best_epoch, done = ck["history"], ck["best_valid"], ck["stopper"]["best_epoch"], \
                ck["epoch"] + 1
        print(f"--max-minutes {args.max_minutes}: stopped after epoch {done}; continue with --resume --out {out}",
              flush=True)
    wall = time.perf_counter() - t_start
    t0 = time.perf_counter()
    test = test_eval()
    eval_seconds = time.perf_counter() - t0
    train_secs = [h["train_seconds"] for h in history]
    results = {
        "model": args.model, "data": source, "num_users": len(sequences), "num_items": num_items,
        "hparams": hp, "status": status, "epochs_run": len(history), "best_epoch": best_epoch,
        "wall_seconds_this_session": wall, "mean_epoch_seconds": sum(train_secs) / max(len(train_secs), 1),
        "mean_valid_eval_seconds": sum(eval_times) / max(len(eval_times), 1),
        "test_eval_seconds": eval_seconds, "valid": best_valid, "test": test, "history": history,
        "threads": torch.get_num_threads(), "device": str(device),
    }
    write_json(out / "results.json", results)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k.split("@")[0] in ("recall", "ndcg"))
    print(f"{status}: {len(history)} epochs, best epoch {best_epoch}; test {shown}; {out / 'results.json'}",
          flush=True)
    return 0
