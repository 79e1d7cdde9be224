#!/usr/bin/env python3
"""Experiments behind docs/experiments/contrastvae.md.

    python scripts/cvae_experiments.py epoch-time [--data PATH] [--threads 1]
        seconds per training epoch (wall and CPU) of ContrastVAE and SASRec, per batching choice
    python scripts/cvae_experiments.py loss-cost [--threads 1]
        time and peak memory of the loss terms inside ContrastVAE, torch vs reference backend
        (each case in its own process so that the RSS high-water mark is clean)
    python scripts/cvae_experiments.py precision [--batches 6] [--threads 1] [--out FILE.json]
        CPU seconds of a few ContrastVAE training steps (Office, full softmax) in fp32 and under
        bf16 autocast: on a CPU without native bf16 (no AVX512-BF16) bf16 is emulated and slower

Run from the repository root with the project's virtual environment.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "amazon"
sys.path.insert(0, str(ROOT))


def _epoch(batcher, step, opt, epoch: int, pad_to: int | None) -> int:
    """One training epoch; returns the number of (padded) positions processed."""
    tokens = 0
    for i, batch in enumerate(batcher.epoch(epoch)):
        if pad_to is not None:  # every batch padded to max_len, as in the published code
            pad = pad_to - batch.items.shape[1]
            for name in ("items", "targets", "valid", "negatives"):
                setattr(batch, name, torch.nn.functional.pad(getattr(batch, name), (pad, 0)))
        tokens += batch.items.numel()
        terms = step(batch, i)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
    return tokens


def epoch_time(args: argparse.Namespace) -> None:
    from fastrecloss.recsys.cvae_train import build, train_step_fn
    from fastrecloss.recsys.data import leave_one_out, load_sequences
    from fastrecloss.recsys.seqdata import SequenceBatcher

    torch.set_num_threads(args.threads)
    data = load_sequences(args.data)
    train = leave_one_out(data.sequences).train
    # pool 0: every batch padded to max_len = 100; pool 1: random batches padded to their longest;
    # pool 32: bucketed by length (the default)
    cases = [("contrastvae", "bf16", 32), ("contrastvae", "fp32", 32), ("contrastvae", "bf16", 1),
             ("contrastvae", "fp32", 0), ("sasrec", "bf16", 32), ("sasrec", "fp32", 32)]
    for model, precision, pool in cases:
        torch.manual_seed(0)
        hp = dict(num_items=data.num_items, hidden=128, layers=1 if model == "contrastvae" else 2, heads=4,
                  hidden_dropout=0.3, attn_dropout=0.3, max_len=100, aug="va", reparam_dropout=0.1, nce_weight=0.3,
                  kl_cap=0.2, anneal_steps=20_000, temperature=0.5, recon="bce", kl_norm="maxlen", backend="torch",
                  precision=precision)
        setup = build(model, hp)
        batcher = SequenceBatcher(train, data.num_items, 100, 256, pool_batches=max(pool, 1))
        opt = torch.optim.Adam(setup.model.parameters(), lr=1e-3)
        step = train_step_fn(setup)
        pad_to = 100 if pool == 0 else None
        _epoch(batcher, step, opt, 0, pad_to)  # warm-up
        t, c = time.perf_counter(), time.process_time()
        tokens = _epoch(batcher, step, opt, 1, pad_to)
        row = dict(model=model, precision=precision, pool=pool, padded_positions=tokens,
                   wall_s=round(time.perf_counter() - t, 2), cpu_s=round(time.process_time() - c, 2))
        print(json.dumps(row), flush=True)


def _loss_case(name: str, backend: str, L: int, threads: int) -> dict[str, float]:
    from fastrecloss.recsys.models.contrastvae import next_item_loss, nt_xent
    from fastrecloss.recsys.training import PeakMemory

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    B, d, items = 256, 128, 2420  # Office: 2,420 items (+ padding row)
    R = 2 * B * L  # both views, every position
    table = (torch.randn(items + 1, d, generator=g) * 0.1).requires_grad_()
    hidden = torch.randn(R, d, generator=g, requires_grad=True)
    targets = torch.randint(1, items + 1, (R,), generator=g)
    negs = torch.randint(1, items + 1, (R,), generator=g)
    weight = torch.ones(R)
    users = torch.randn(2 * B, d, generator=g, requires_grad=True)

    def call() -> None:
        if name == "nt_xent":
            loss = nt_xent(users[:B], users[B:], 0.5, backend=backend)
        else:
            loss = next_item_loss(hidden, table, targets, negs if name == "bce" else None, weight, recon=name,
                                  num_items=items, backend=backend)
        loss.backward()

    call()
    walls, cpus = [], []
    with PeakMemory() as mem:
        for _ in range(5):
            t, c = time.perf_counter(), time.process_time()
            call()
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    return {"term": name, "backend": backend, "rows": R if name != "nt_xent" else 2 * B, "L": L,
            "wall_ms": round(1e3 * min(walls), 2), "cpu_ms": round(1e3 * min(cpus), 2),
            "peak_extra_mib": round((mem.peak or 0) / 2**20, 1)}


def loss_cost(args: argparse.Namespace) -> None:
    for name, L in (("bce", 10), ("bce", 100), ("softmax_ce", 10), ("softmax_ce", 100), ("nt_xent", 1)):
        for backend in ("reference", "torch"):
            cmd = [sys.executable, __file__, "_case", name, backend, str(L), str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            print(out, flush=True)


def precision(args: argparse.Namespace) -> None:
    from fastrecloss.recsys.cvae_train import build, train_step_fn
    from fastrecloss.recsys.data import leave_one_out, load_sequences
    from fastrecloss.recsys.seqdata import SequenceBatcher

    torch.set_num_threads(args.threads)
    data = load_sequences(args.data)
    train = leave_one_out(data.sequences).train
    batches = list(SequenceBatcher(train, data.num_items, 100, 256, negatives=False).epoch(0))[:args.batches]
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    rows = []
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        hp = dict(num_items=data.num_items, hidden=128, layers=1, heads=4, hidden_dropout=0.3, attn_dropout=0.3,
                  max_len=100, aug="va", reparam_dropout=0.1, nce_weight=0.3, kl_cap=0.2, anneal_steps=20_000,
                  temperature=0.5, recon="softmax_ce", kl_norm="maxlen", backend="torch", precision=prec)
        setup = build("contrastvae", hp)
        opt = torch.optim.Adam(setup.model.parameters(), lr=1e-3)
        step = train_step_fn(setup)
        c = time.process_time()
        for i, batch in enumerate(batches):
            terms = step(batch, i)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
        rows.append(dict(precision=prec, batches=len(batches), positions=sum(b.items.numel() for b in batches),
                         cpu_s=round(time.process_time() - c, 2)))
    result = dict(data=Path(args.data).name, threads=args.threads, avx512_bf16="avx512_bf16" in flags,
                  cpu=next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                            if line.startswith("model name")), "?") if flags else "?", rows=rows)
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_case":
        print(json.dumps(_loss_case(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("epoch-time")
    p.add_argument("--data", default=str(DATA / "Office_Products.txt"))
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("loss-cost")
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("precision")
    p.add_argument("--data", default=str(DATA / "Office_Products.txt"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--out", default=None)
    args = parser.parse_args()
    {"epoch-time": epoch_time, "loss-cost": loss_cost, "precision": precision}[args.cmd](args)


if __name__ == "__main__":
    main()
