"""Count the bytes each fastrecloss.distributed mode hands to torch.distributed per step (one forward +
backward), per rank, on K local gloo ranks:

    .venv/bin/python scripts/dist_comm_volume.py --world 2 --rows 1024 --dim 64 --items 20000

Counted: the payload of every Python-level collective call (all_reduce, all_gather,
all_gather_object on the error path only, the autograd all-gather's forward, the ring's isend);
the backward of the autograd all-gather (a reduce-scatter inside torch's autograd) is not visible
here and is reported as the same size as its forward, by construction. Payload = the tensor this
rank contributes (for an all-gather: its input; an all-reduce: its buffer; a send: the tensor sent).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist


def _count(counter: dict[str, int]) -> None:
    import torch.distributed._functional_collectives as funcol

    def wrap(module, name, size):
        orig = getattr(module, name)

        def inner(*args, **kwargs):
            counter[name] += size(*args, **kwargs)
            return orig(*args, **kwargs)
        setattr(module, name, inner)

    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    wrap(dist, "all_reduce", lambda t, *a, **k: nbytes(t))
    wrap(dist, "all_gather", lambda out, t, *a, **k: nbytes(t))
    wrap(funcol, "all_gather_single", lambda t, *a, **k: nbytes(t))
    wrap(dist, "batch_isend_irecv", lambda ops: sum(nbytes(op.tensor) for op in ops if op.op is dist.isend))


def rank_main(rank: int, world: int, port: int, R: int, d: int, items: int) -> None:
    import fastrecloss.distributed as D
    from fastrecloss import functional as F

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    g = torch.Generator().manual_seed(rank)
    counter: dict[str, int] = defaultdict(int)
    _count(counter)
    results = {}
    q = torch.randn(R, d, generator=g, requires_grad=True)
    p = torch.randn(R, d, generator=g, requires_grad=True)
    ids = torch.randint(0, 10 * R, (R,), generator=g)
    def gathered():
        pool, pool_ids, _ = D.gather_negatives(p, ids=ids)
        return F.infonce(q, p, pool, remove_accidental_hits=True, pos_ids=ids, neg_ids=pool_ids, reduction="sum")

    modes = {"gather_negatives (in-batch)": gathered,
             "ring_logsumexp (in-batch)": lambda: D.ring_logsumexp(q, p, ids=ids, pos_ids=ids).sum()}
    start, stop = rank * items // world, (rank + 1) * items // world
    shard = torch.randn(stop - start, d, generator=g, requires_grad=True)
    target = torch.randint(0, items, (R,), generator=torch.Generator().manual_seed(0))
    qs = torch.randn(R, d, generator=torch.Generator().manual_seed(1), requires_grad=True)
    modes["sharded softmax_ce"] = lambda: D.softmax_ce(qs, shard, target, shard=(start, stop))
    for name, fn in modes.items():
        counter.clear()
        fn().backward()
        results[name] = dict(counter)
    if rank == 0:
        print(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1024, help="rows per rank (gathered modes) / replicated (sharded)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--items", type=int, default=20000, help="catalogue size (sharded mode)")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--rank-main"]
    procs = [subprocess.Popen([*cmd, *map(str, (r, args.world, port, args.rows, args.dim, args.items))], env=env,
                              stdout=subprocess.PIPE, text=True) for r in range(args.world)]
    out = [p.communicate(timeout=600)[0] for p in procs]
    results = json.loads(out[0].strip().splitlines()[-1])
    print(f"K={args.world}, R={args.rows}, d={args.dim}, I={args.items}, fp32: bytes rank 0 hands to "
          "torch.distributed per forward+backward")
    print("| mode | " + " | ".join(("all_gather", "all_gather_single", "all_reduce", "batch_isend_irecv")) + " |")
    print("|---|---|---|---|---|")
    for name, c in results.items():
        print(f"| {name} | " + " | ".join(f"{c.get(k, 0):,}" for k in ("all_gather", "all_gather_single",
                                                                       "all_reduce", "batch_isend_irecv")) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank-main"]:
        rank_main(*map(int, sys.argv[2:8]))
    else:
        main()
