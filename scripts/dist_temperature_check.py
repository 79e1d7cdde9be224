"""A learnable temperature across 2 gloo ranks (CPU): the distributed losses against one process.

* ``distributed.softmax_ce`` over a catalogue sharded by rows (replicated loss): every rank's ∂τ is the
  whole ∂τ of the one-process loss, as its ∂query is.
* ``distributed.ring_logsumexp`` with distinct rows per rank: ∂τ is this rank's rows' part (the query
  tower's convention); the sum over ranks is the one-process ∂τ.

Run: ``.venv/bin/python scripts/dist_temperature_check.py`` (exits 1 on a mismatch; tests/test_temperature.py
runs it under ``-m slow``).
"""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastrecloss.distributed as D
from fastrecloss import functional as F

TAU, WORLD = 0.4, 2
CUT = [0, 4, 11]  # table rows per rank
ROWS = [slice(0, 2), slice(2, 6)]  # ring: query rows per rank


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"query": torch.randn(6, 4, generator=g, dtype=torch.float64),
            "table": torch.randn(CUT[-1], 4, generator=g, dtype=torch.float64),
            "target": torch.tensor([0, 3, 10, 5, 7, -100])}


def leaf_tau() -> torch.Tensor:
    return torch.tensor(TAU, dtype=torch.float64, requires_grad=True)


def worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    x = inputs()
    shard = x["table"][CUT[rank]:CUT[rank + 1]]
    q, tau, tau_ring = x["query"].clone().requires_grad_(), leaf_tau(), leaf_tau()
    loss = D.softmax_ce(q, shard, x["target"], shard=(CUT[rank], CUT[rank + 1]), temperature=tau, backend="torch")
    loss.backward()
    D.ring_logsumexp(x["query"][ROWS[rank]], shard, temperature=tau_ring, backend="torch").sum().backward()
    torch.save({"loss": loss.detach(), "query": q.grad, "tau": tau.grad, "tau_ring": tau_ring.grad},
               f"{out}/{rank}.pt")
    dist.destroy_process_group()


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(port, out), nprocs=WORLD)
        got = [torch.load(Path(out) / f"{k}.pt") for k in range(WORLD)]
    x = inputs()
    q, tau, tau_ring = x["query"].clone().requires_grad_(), leaf_tau(), leaf_tau()
    want = F.softmax_ce(q, x["table"], x["target"], temperature=tau, backend="reference")
    want.backward()
    F.sampled_logsumexp(x["query"], x["table"], temperature=tau_ring, backend="reference").sum().backward()
    ok = True

    def report(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        nonlocal ok
        err = (a - b).abs().max().item()
        ok &= err <= 1e-12 * max(1.0, b.abs().max().item())
        print(f"{name}: {a.flatten()[0].item():.12g} vs one process {b.flatten()[0].item():.12g} (max err {err:.1e})")

    for k, r in enumerate(got):
        report(f"rank {k} sharded loss", r["loss"], want.detach())
        report(f"rank {k} sharded dquery", r["query"], q.grad)
        report(f"rank {k} sharded dtau", r["tau"], tau.grad)
    report("ring: sum over ranks of dtau", sum(r["tau_ring"] for r in got), tau_ring.grad)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
