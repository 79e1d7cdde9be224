"""fastrecloss.distributed against one process, on real gloo process groups (2 and 3 ranks).

One launch for every world size: max(WORLDS) processes run this file as a script (``--worker``)
and, for each world size in turn (3, then 2: the third rank leaves), join a gloo group on
127.0.0.1 (collectives time out after ``COLLECTIVE_TIMEOUT`` s, so a bug fails instead of hanging)
and run every case of ``CASES``; each rank writes what it saw to a JSON file per world size that
the tests below read. A loss case passes on a rank when its loss and every gradient it
holds match the single-process reference on the concatenated inputs (SPEC §8: the float64
oracle, with the float32 reference's own error plus 1e-5 relative as the allowance); an error
case passes when every rank raised the expected error (and none hung).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import assert_close_to_oracle  # noqa: E402

import fastrecloss.distributed as D  # noqa: E402
from fastrecloss import functional as F  # noqa: E402

COLLECTIVE_TIMEOUT = 120  # generous: rank start-up on a loaded 2-core machine took up to 16 s
LAUNCH_TIMEOUT = 480
WORLDS = (2, 3)
# catalogue rows per rank: uneven, and with 3 ranks one rank holds none
SHARDS = {2: [3, 8], 3: [4, 0, 7]}
# rows per rank for the gathered modes: uneven, and with 3 ranks one rank has none
ROWS = {2: [4, 2], 3: [3, 0, 4]}
R, DIM, ITEMS = 6, 5, 11
DTYPE = torch.float32


# ----------------------------------------------------------------------------------------------
# sharded catalogue / pool


@dataclass(frozen=True)
class ShardCase:
    fn: str
    hp: dict[str, Any] = field(default_factory=dict)
    pos: str = "vec"  # vec: pos [R, d]; idx: a table row (target / pos_idx); none: sampled_logsumexp
    log_q: bool = False
    pos_log_q: bool = False
    mask: str | None = None  # col [N] | row [R, N] (row 0 fully masked: a row without negatives)
    hits: bool = False
    weight: bool = False
    ignore: bool = False  # one target = ignore_index
    reduction: str = "mean"
    tau: float = 1.0
    backend: str = "torch"
    rows: int = R
    dtype: torch.dtype = DTYPE


SHARD_CASES = {
    "softmax_ce": ShardCase("softmax_ce", pos="idx"),
    "softmax_ce_logq_weight_ignore": ShardCase("softmax_ce", pos="idx", log_q=True, weight=True, ignore=True, tau=0.5),
    "softmax_ce_pos_log_q_row_mask_none": ShardCase("softmax_ce", pos="idx", log_q=True, pos_log_q=True, mask="row",
                                                    reduction="none"),
    "softmax_ce_triton": ShardCase("softmax_ce", pos="idx", log_q=True, mask="col", backend="triton"),
    "softmax_ce_no_rows": ShardCase("softmax_ce", pos="idx", rows=0),
    "softmax_ce_smoothing_zloss_logq_row_mask": ShardCase("softmax_ce", {"label_smoothing": 0.1, "z_loss": 0.01},
                                                          pos="idx", log_q=True, mask="row", ignore=True),
    "softmax_ce_smoothing_col_mask_none": ShardCase("softmax_ce", {"label_smoothing": 0.2}, pos="idx", mask="col",
                                                    reduction="none"),
    "softmax_ce_unchecked": ShardCase("softmax_ce", {"check": False}, pos="idx", log_q=True),
    "softmax_ce_bf16": ShardCase("softmax_ce", pos="idx", log_q=True, weight=True, dtype=torch.bfloat16),
    "infonce_logq_hits_col_mask": ShardCase("infonce", log_q=True, hits=True, mask="col"),
    "infonce_plus_row_mask_sum": ShardCase("infonce_plus", {"eps": 0.4, "lam": 1.1}, mask="row", weight=True,
                                           reduction="sum", tau=0.7),
    "dcl_pos_idx_hits": ShardCase("dcl", pos="idx", hits=True, log_q=True, ignore=True),
    "mine_hits_row_mask": ShardCase("mine", hits=True, mask="row", pos_log_q=True),
    "mine_plus_logq_none": ShardCase("mine_plus", {"lam": 1.2}, log_q=True, hits=True, reduction="none"),
    "sampled_logsumexp": ShardCase("sampled_logsumexp", pos="none", log_q=True, mask="row"),
}


def global_inputs(case: ShardCase) -> dict[str, Tensor]:
    """The whole problem in float64 (the same on every rank: one seed)."""
    g = torch.Generator().manual_seed(7)
    rows = case.rows
    x = {"query": torch.randn(rows, DIM, generator=g, dtype=torch.float64),
         "pos": torch.randn(rows, DIM, generator=g, dtype=torch.float64),
         "table": torch.randn(ITEMS, DIM, generator=g, dtype=torch.float64),
         "target": torch.randint(0, ITEMS, (rows,), generator=g),
         "log_q": 0.5 * torch.randn(ITEMS, generator=g, dtype=torch.float64),
         "pos_log_q": 0.5 * torch.randn(rows, generator=g, dtype=torch.float64),
         "weight": torch.rand(rows, generator=g, dtype=torch.float64) + 0.1,
         "ids": torch.randint(0, 4, (ITEMS,), generator=g),
         "pos_ids": torch.randint(0, 4, (rows,), generator=g),
         "col_mask": torch.rand(ITEMS, generator=g) < 0.25,
         "row_mask": torch.rand(rows, ITEMS, generator=g) < 0.3,
         "upstream": torch.randn(rows, generator=g, dtype=torch.float64)}
    if rows:
        x["target"][3] = x["target"][1]  # a repeated target
        x["row_mask"][0] = True  # a row without any negative
    if case.ignore and rows:
        x["target"][2] = -100
    return x


def call_kwargs(case: ShardCase, x: dict[str, Tensor], items: slice) -> dict[str, Any]:
    """The keywords of the call: per-item ones sliced to ``items``, per-row ones whole."""
    kw: dict[str, Any] = {"temperature": case.tau, "reduction": case.reduction, "backend": case.backend, **case.hp}
    if case.log_q:
        kw["log_q"] = x["log_q"][items]
    if case.pos_log_q:
        kw["pos_log_q"] = x["pos_log_q"]
    if case.weight:
        kw["weight"] = x["weight"]
    if case.mask:
        kw["neg_mask"] = x["col_mask"][items] if case.mask == "col" else x["row_mask"][:, items]
    if case.hits:
        kw["remove_accidental_hits"] = True
        if case.pos == "idx":
            kw["neg_ids"] = torch.arange(ITEMS)[items]  # the table's own ids: removes the positive's row
        else:
            kw["pos_ids"], kw["neg_ids"] = x["pos_ids"], x["ids"][items]
    return kw


def single_process(case: ShardCase, x: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The reference backend in one process on the whole problem, in ``dtype`` (inputs rounded to
    the tested dtype first, as tests/helpers.py does for the oracle)."""
    leaves = {k: x[k].to(case.dtype).to(dtype).requires_grad_() for k in ("query", "pos", "table")}
    kw = call_kwargs(case, {k: v.to(case.dtype).to(dtype) if v.is_floating_point() else v for k, v in x.items()},
                     slice(None))
    kw["backend"] = "reference"
    kw.pop("check", None)
    valid = x["target"] != -100
    target = torch.where(valid, x["target"], 0)
    if case.pos == "idx":  # the sharded call's conventions, spelled out for functional
        if case.log_q and not case.pos_log_q:
            kw["pos_log_q"] = kw["log_q"][target]
        kw["weight"] = kw.get("weight", torch.ones(case.rows, dtype=dtype)) * valid.to(dtype)
    if case.fn == "softmax_ce":
        loss = F.softmax_ce(leaves["query"], leaves["table"], target, **kw)
    elif case.pos == "none":
        loss = F.sampled_logsumexp(leaves["query"], leaves["table"], **kw)
    elif case.pos == "idx":
        if case.hits:
            kw["pos_ids"] = target
        loss = getattr(F, case.fn)(leaves["query"], None, leaves["table"], pos_idx=target, **kw)
    else:
        loss = getattr(F, case.fn)(leaves["query"], leaves["pos"], leaves["table"], **kw)
    return _with_grads(loss, leaves, x["upstream"].to(dtype))


def _with_grads(loss: Tensor, leaves: dict[str, Tensor], upstream: Tensor) -> dict[str, Tensor]:
    grad = upstream if loss.dim() else None
    if loss.requires_grad:
        loss.backward(grad)
    out = {"loss": loss.detach()}
    for k, v in leaves.items():
        out[k] = v.grad if v.grad is not None else torch.zeros_like(v)
    return out


def run_shard_case(case: ShardCase, rank: int, world: int) -> None:
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    items = slice(start, start + sizes[rank])
    x = global_inputs(case)
    leaves = {"query": x["query"].to(case.dtype).requires_grad_(), "pos": x["pos"].to(case.dtype).requires_grad_(),
              "table": x["table"][items].to(case.dtype).requires_grad_()}
    kw = call_kwargs(case, {k: v.to(case.dtype) if v.is_floating_point() else v for k, v in x.items()}, items)
    fn = getattr(D, case.fn)
    shard = (start, start + sizes[rank])
    if case.fn == "softmax_ce":
        loss = fn(leaves["query"], leaves["table"], x["target"], shard=shard, **kw)
    elif case.pos == "none":
        loss = fn(leaves["query"], leaves["table"], shard=shard, **kw)
    elif case.pos == "idx":
        loss = fn(leaves["query"], None, leaves["table"], pos_idx=x["target"], shard=shard, **kw)
    else:
        loss = fn(leaves["query"], leaves["pos"], leaves["table"], shard=shard, **kw)
    got = _with_grads(loss, leaves, x["upstream"].to(case.dtype))
    oracle = single_process(case, x, torch.float64)
    ref = single_process(case, x, case.dtype)
    for k in ("loss", "query", "pos", "table"):
        want_o, want_r = (oracle[k], ref[k]) if k != "table" else (oracle[k][items], ref[k][items])
        assert_close_to_oracle(got[k], want_r, want_o, case.dtype, k)


# ----------------------------------------------------------------------------------------------
# cross-rank negatives


def gathered_inputs(world: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(11)
    n = sum(ROWS[world])
    pool = 7
    return {"query": torch.randn(n, DIM, generator=g, dtype=torch.float64),
            "pos": torch.randn(n, DIM, generator=g, dtype=torch.float64),
            "ids": torch.randint(0, 5, (n,), generator=g),  # duplicates: accidental hits across ranks
            "log_q": 0.5 * torch.randn(n, generator=g, dtype=torch.float64),
            "pool": torch.randn(world * pool, DIM, generator=g, dtype=torch.float64),
            "pool_ids": torch.randint(0, 5, (world * pool,), generator=g),
            "pool_log_q": 0.5 * torch.randn(world * pool, generator=g, dtype=torch.float64)}


def _pool_slice(world: int, rank: int) -> slice:
    sizes = [2 + 3 * k for k in range(world)]  # uneven pool parts that sum to 7·world for world ≤ 3
    sizes[-1] = 7 * world - sum(sizes[:-1])
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def run_gather_case(mode: str, rank: int, world: int) -> None:
    x = gathered_inputs(world)
    start = sum(ROWS[world][:rank])
    rows = slice(start, start + ROWS[world][rank])
    n_global = x["query"].shape[0]
    local = {k: x[k][rows].to(DTYPE) if x[k].is_floating_point() else x[k][rows] for k in ("query", "pos", "ids",
                                                                                            "log_q")}
    q, p = local["query"].requires_grad_(), local["pos"].requires_grad_()
    leaves = {"query": q, "pos": p}
    if mode == "in_batch":
        pos_all, ids_all, lq_all = D.gather_negatives(p, ids=local["ids"], log_q=local["log_q"])
        assert torch.equal(ids_all, x["ids"]) and torch.equal(lq_all, x["log_q"].to(DTYPE))
        loss = F.infonce(q, p, pos_all, remove_accidental_hits=True, pos_ids=local["ids"], neg_ids=ids_all,
                         log_q=lq_all, pos_log_q=local["log_q"], reduction="sum", backend="torch") / n_global
    else:
        part = _pool_slice(world, rank)
        pool = x["pool"][part].to(DTYPE).requires_grad_()
        leaves["pool"] = pool
        pool_all, ids_all, lq_all = D.gather_negatives(pool, ids=x["pool_ids"][part],
                                                       log_q=x["pool_log_q"][part].to(DTYPE))
        loss = F.mine_plus(q, p, pool_all, lam=1.2, remove_accidental_hits=True, pos_ids=local["ids"],
                           neg_ids=ids_all, log_q=lq_all, reduction="sum", backend="torch") / n_global
    loss.backward()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)

    def single(dtype: torch.dtype) -> dict[str, Tensor]:
        lv = {k: x[k].to(DTYPE).to(dtype).requires_grad_() for k in ("query", "pos", "pool")}
        lq = x["log_q"].to(DTYPE).to(dtype)
        if mode == "in_batch":
            out = F.infonce(lv["query"], lv["pos"], None, in_batch=True, remove_accidental_hits=True, pos_ids=x["ids"],
                            log_q=lq, pos_log_q=lq,
                            backend="reference")
        else:
            out = F.mine_plus(lv["query"], lv["pos"], lv["pool"], lam=1.2, remove_accidental_hits=True,
                              pos_ids=x["ids"], neg_ids=x["pool_ids"], log_q=x["pool_log_q"].to(DTYPE).to(dtype),
                              backend="reference")
        return _with_grads(out, lv, torch.ones(()))

    oracle, ref = single(torch.float64), single(DTYPE)
    assert_close_to_oracle(total, ref["loss"], oracle["loss"], DTYPE, "loss (summed over ranks)")
    for k, v in leaves.items():
        part = rows if k != "pool" else _pool_slice(world, rank)
        grad = v.grad if v.grad is not None or v.numel() else torch.zeros_like(v)  # a rank without rows
        assert_close_to_oracle(grad, ref[k][part], oracle[k][part], DTYPE, k)


def run_ring_case(rank: int, world: int) -> None:
    """ring_logsumexp over the global in-batch pool (own column and duplicates removed by id, log_q),
    weighted by a random upstream gradient, against one process on the concatenated batch."""
    x = gathered_inputs(world)
    start = sum(ROWS[world][:rank])
    rows = slice(start, start + ROWS[world][rank])
    w = torch.randn(x["query"].shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q, p = x["query"][rows].to(DTYPE).requires_grad_(), x["pos"][rows].to(DTYPE).requires_grad_()
    lse = D.ring_logsumexp(q, p, ids=x["ids"][rows], pos_ids=x["ids"][rows], log_q=x["log_q"][rows].to(DTYPE),
                           temperature=0.5, backend="torch")
    (lse * w[rows].to(DTYPE)).sum().backward()

    def single(dtype: torch.dtype) -> dict[str, Tensor]:
        lv = {k: x[k].to(DTYPE).to(dtype).requires_grad_() for k in ("query", "pos")}
        out = F.sampled_logsumexp(lv["query"], lv["pos"], neg_ids=x["ids"], pos_ids=x["ids"], temperature=0.5,
                                  remove_accidental_hits=True, log_q=x["log_q"].to(DTYPE).to(dtype),
                                  backend="reference")
        return {"lse": out.detach(), **_with_grads((out * w.to(dtype)).sum(), lv, torch.ones(()))}

    oracle, ref = single(torch.float64), single(DTYPE)
    assert_close_to_oracle(lse, ref["lse"][rows], oracle["lse"][rows], DTYPE, "lse")
    for k, v in (("query", q), ("pos", p)):
        grad = v.grad if v.grad is not None or v.numel() else torch.zeros_like(v)
        assert_close_to_oracle(grad, ref[k][rows], oracle[k][rows], DTYPE, k)


# ----------------------------------------------------------------------------------------------
# bad configurations: every rank must raise (and the group must stay usable afterwards)


def _bad_shards(spans: dict[int, tuple[int, int]]) -> Callable[[int, int], None]:
    def run(rank: int, world: int) -> None:
        a, b = spans[rank] if rank in spans else (spans[max(spans)][1], spans[max(spans)][1] + 2)
        q = torch.randn(3, DIM)
        D.softmax_ce(q, torch.randn(b - a, DIM), torch.tensor([0, 1, 2]), shard=(a, b))
    return run


def _bad_dim(rank: int, world: int) -> None:
    d = DIM + (rank == world - 1)
    D.softmax_ce(torch.randn(3, d), torch.randn(4, d), torch.tensor([0, 1, 2]))


def _bad_target(rank: int, world: int) -> None:
    D.softmax_ce(torch.randn(3, DIM), torch.randn(4, DIM), torch.tensor([0, 4 * world, 2]), shard=(4 * rank,
                 4 * rank + 4))


def _bad_local_arg(rank: int, world: int) -> None:
    n = 4 + (rank == world - 1)  # the last rank's log_q has the wrong length
    D.softmax_ce(torch.randn(3, DIM), torch.randn(4, DIM), torch.tensor([0, 1, 2]), log_q=torch.zeros(n))


def _bad_rows(rank: int, world: int) -> None:
    r = 3 + (rank == 0)
    D.infonce(torch.randn(r, DIM), torch.randn(r, DIM), torch.randn(4, DIM))


def _grad_on_one_rank(rank: int, world: int) -> None:
    D.softmax_ce(torch.randn(3, DIM, requires_grad=rank == 0), torch.randn(4, DIM), torch.tensor([0, 1, 2]))


def _unsupported_keyword(rank: int, world: int) -> None:
    D.infonce(torch.randn(3, DIM), torch.randn(3, DIM), torch.randn(4, DIM), neg_idx=torch.zeros(3, 2, dtype=int))


def _tau_on_last_rank(rank: int, world: int) -> None:
    D.softmax_ce(torch.randn(3, DIM), torch.randn(4, DIM), torch.tensor([0, 1, 2]),
                 temperature=0.5 if rank == world - 1 else 1.0)


def _lam_on_last_rank(rank: int, world: int) -> None:
    D.mine_plus(torch.randn(3, DIM), torch.randn(3, DIM), torch.randn(4, DIM), lam=1.5 if rank == world - 1 else 1.1)


def _ring_bad_backend_on_last_rank(rank: int, world: int) -> None:
    """Raised inside the ring's forward on that rank only, this left the others waiting for its block."""
    D.ring_logsumexp(torch.randn(2, DIM), torch.randn(3, DIM), backend="bogus" if rank == world - 1 else "torch")


def _ids_dtype_on_last_rank(rank: int, world: int) -> None:
    """int32 ids on one rank: the all-gather's buffers were sized by each rank's own dtype."""
    dtype = torch.int32 if rank == world - 1 else torch.int64
    D.gather_negatives(torch.randn(3, DIM), ids=torch.arange(3, dtype=dtype))


def _bad_gather_dim(rank: int, world: int) -> None:
    D.gather_negatives(torch.randn(3, DIM + (rank == 1), requires_grad=True))


# name -> (call, expected exception type, text every rank's message must contain)
ERROR_CASES: dict[str, tuple[Callable[[int, int], None], type, str]] = {
    "overlapping_shards": (_bad_shards({0: (0, 6), 1: (4, 11)}), ValueError, "shards overlap"),
    "shards_with_a_gap": (_bad_shards({0: (0, 3), 1: (5, 11)}), ValueError, "do not cover the catalogue: rows [3, 5)"),
    "d_differs": (_bad_dim, ValueError, "d (query.shape[1]) must be the same on every rank"),
    "target_outside_every_shard": (_bad_target, ValueError, "target has values in [0, "),
    "bad_argument_on_one_rank": (_bad_local_arg, ValueError, "softmax_ce: log_q must have shape"),  # public name
    "temperature_differs": (_tau_on_last_rank, ValueError, "temperature must be the same on every rank"),
    "lam_differs": (_lam_on_last_rank, ValueError, "lam must be the same on every rank, got [1.1"),
    "gather_ids_dtype_differs": (_ids_dtype_on_last_rank, ValueError, "ids' dtype (as a code) must be the same"),
    "ring_backend_on_one_rank": (_ring_bad_backend_on_last_rank, ValueError, "backend must be one of"),
    "rows_differ": (_bad_rows, ValueError, "the number of rows R"),
    "gather_d_differs": (_bad_gather_dim, ValueError, "the negatives' dimension d"),
    "ring_without_pos_ids": (lambda r, w: D.ring_logsumexp(torch.randn(2, DIM), torch.randn(3, DIM),
                                                           ids=torch.arange(3)), ValueError, "needs both ids"),
    "query_grad_on_one_rank": (_grad_on_one_rank, ValueError, "whether the query needs a gradient"),
    "unsupported_keyword": (_unsupported_keyword, ValueError, "neg_idx: not supported by the sharded losses"),
}


def _after_errors(rank: int, world: int) -> None:
    run_shard_case(SHARD_CASES["softmax_ce"], rank, world)


CASES: dict[str, Callable[[int, int], None]] = {
    **{f"shard:{k}": functools.partial(run_shard_case, c) for k, c in SHARD_CASES.items()},
    "gather:in_batch": lambda r, w: run_gather_case("in_batch", r, w),
    "gather:pool": lambda r, w: run_gather_case("pool", r, w),
    "ring:in_batch_logsumexp": run_ring_case,
}


# ----------------------------------------------------------------------------------------------
# the MF trainer: the same metrics as one process on the same global batch and seed

MF_CASES: dict[str, dict[str, Any]] = {
    "gather_in_batch": {"loss": "infonce", "sampler": "in-batch", "dist": "gather"},
    "gather_in_batch_logq": {"loss": "infonce_plus", "sampler": "in-batch", "logq": True, "dist": "gather"},
    "gather_shared_logq_exclude": {"loss": "mine_plus", "layout": "shared", "negatives": 40, "logq": True,
                                   "exclude_positives": True, "dist": "gather"},
    "gather_full": {"loss": "bpr", "layout": "full", "dist": "gather"},
    "shard_softmax_ce_exclude": {"loss": "softmax_ce", "exclude_positives": True, "dist": "shard"},
    "shard_dcl": {"loss": "dcl", "layout": "full", "temperature": 0.5, "dist": "shard"},
}


def mf_run(name: str) -> dict[str, Any]:
    from fastrecloss.recsys.data import ratio_split, synthetic
    from fastrecloss.recsys.mf_train import MFConfig, train_mf

    split = ratio_split(synthetic(num_users=120, num_items=90, dim=8, per_user=10, seed=3), (0.8, 0.1, 0.1), seed=3)
    cfg = MFConfig(epochs=2, batch_size=250, dim=8, lr=0.05, patience=10, progress=False, seed=3, **MF_CASES[name])
    res = train_mf(cfg, split=split)
    return {"test": res["test"], "valid": res["valid"], "loss": [h["loss"] for h in res["history"]],
            "world_size": res["world_size"]}


@functools.cache  # the one-process run of a case is the same for every world size: train it once
def one_process_mf(name: str) -> dict[str, Any]:
    return mf_run(name)


def assert_same_training(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    """Metrics equal to 1e-9 (a flipped rank would move them by ≥ 1/users); losses to 1e-5 relative
    (the sums run in another order)."""
    for split in ("valid", "test"):
        for k, v in want[split].items():
            assert abs(got[split][k] - v) <= 1e-9, f"{where}: {split} {k} {got[split][k]} != one process {v}"
    for a, b in zip(got["loss"], want["loss"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), f"{where}: epoch losses {got['loss']} != one process {want['loss']}"


def worker(rank: int, worlds: list[int], ports: list[int], out: Path) -> None:
    """One process, one group per world size in turn (largest first, the ranks ≥ a smaller world
    leave): the imports and lazy initialisations are paid once, the groups are real ones."""
    torch.set_num_threads(1)
    for world, port in zip(worlds, ports, strict=True):
        if rank < world:
            run_group(rank, world, port, out / f"world{world}")


def run_group(rank: int, world: int, port: int, out: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
    results: dict[str, Any] = {}
    for name, fn in CASES.items():
        t0 = time.perf_counter()
        try:
            fn(rank, world)
            results[name] = {"ok": True, "seconds": time.perf_counter() - t0}
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = {"ok": False, "error": traceback.format_exc(limit=6)}
    for name, (fn, _, _) in ERROR_CASES.items():
        try:
            fn(rank, world)
            results[f"error:{name}"] = {"raised": None}
        except Exception as e:  # noqa: BLE001 - the type and message are what the test checks
            results[f"error:{name}"] = {"raised": type(e).__name__, "message": str(e)}
    for name in MF_CASES:
        try:
            results[f"mf:{name}"] = {"ok": True, "result": mf_run(name)}
        except Exception:  # noqa: BLE001
            results[f"mf:{name}"] = {"ok": False, "error": traceback.format_exc(limit=6)}
    try:
        _after_errors(rank, world)
        results["after_errors"] = {"ok": True}
    except Exception:  # noqa: BLE001
        results["after_errors"] = {"ok": False, "error": traceback.format_exc(limit=6)}
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# the launcher and the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worlds: tuple[int, ...], out: Path, timeout: float = LAUNCH_TIMEOUT) -> dict[int, list[dict[str, Any]]]:
    """Start max(worlds) ranks of this file's worker, which join a group of each world size in turn;
    return each world's per-rank results (fail on a hang)."""
    worlds = tuple(sorted(worlds, reverse=True))
    ports = [free_port() for _ in worlds]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), ",".join(map(str, worlds)),
                               ",".join(map(str, ports)), str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(worlds[0])]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the launch of world sizes {worlds} did not finish in {timeout} s (a hang?)")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{log[-3000:]}"
    return {w: [json.loads((out / f"world{w}" / f"rank{rank}.json").read_text()) for rank in range(w)]
            for w in worlds}


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """One launch for every world size of ``WORLDS``."""
    out = tmp_path_factory.mktemp("dist")
    for w in WORLDS:
        (out / f"world{w}").mkdir()
    return launch(WORLDS, out)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}ranks")
def ranks(request: pytest.FixtureRequest, launched: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return launched[request.param]


FUNCTIONAL_SMOOTHING = "label_smoothing" in inspect.signature(F.softmax_ce).parameters


@pytest.mark.parametrize("case", [*CASES, "after_errors"])
def test_matches_one_process(ranks: list[dict[str, Any]], case: str) -> None:
    shard_case = SHARD_CASES.get(case.removeprefix("shard:"))
    if shard_case is not None and "label_smoothing" in shard_case.hp and not FUNCTIONAL_SMOOTHING:
        pytest.skip("the one-process oracle needs functional.softmax_ce(label_smoothing=) (issue 11, not merged)")
    for rank, results in enumerate(ranks):
        assert results[case]["ok"], f"rank {rank}/{len(ranks)}:\n{results[case].get('error')}"


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_configuration_fails_on_every_rank(ranks: list[dict[str, Any]], case: str) -> None:
    _, kind, text = ERROR_CASES[case]
    for rank, results in enumerate(ranks):
        got = results[f"error:{case}"]
        assert got["raised"] == kind.__name__, f"rank {rank}/{len(ranks)}: raised {got}"
        assert text in got["message"], f"rank {rank}/{len(ranks)}: {got['message']!r}"


@pytest.mark.parametrize("case", list(MF_CASES))
def test_mf_trainer_matches_one_process(ranks: list[dict[str, Any]], case: str) -> None:
    if MF_CASES[case].get("logq") and MF_CASES[case].get("sampler") == "in-batch" and not FUNCTIONAL_SMOOTHING:
        pytest.skip("one process applies logQ to the in-batch positive only with issue 11's functional (not merged)")
    want = one_process_mf(case)
    assert want["world_size"] == 1
    for rank, results in enumerate(ranks):
        got = results[f"mf:{case}"]
        assert got["ok"], f"rank {rank}/{len(ranks)}:\n{got.get('error')}"
        assert got["result"]["world_size"] == len(ranks)
        assert_same_training(got["result"], want, f"rank {rank}/{len(ranks)}")


def test_torchrun_train_mf_matches_one_process(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m fastrecloss train mf`` (the CLI, torchrun's env:// set-up) on a
    small .inter file: the same metrics as the one-process run of the same command."""
    from fastrecloss.recsys.data import synthetic
    from fastrecloss.recsys.mf_train import MFConfig, train_mf

    inter = synthetic(num_users=100, num_items=70, dim=8, per_user=8, seed=5)
    data = tmp_path / "tiny.inter"
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"u{u}\ti{i}\t5\t{t}" for t, (u, i) in enumerate(zip(inter.users, inter.items))]
    data.write_text("\n".join(lines) + "\n")
    args = ["train", "mf", "--data", str(data), "--loss", "softmax_ce", "--epochs", "2", "--batch-size", "200",
            "--dim", "8", "--lr", "0.05", "--no-progress", "--dist", "shard", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastrecloss", *args], env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "test: recall@20" in proc.stdout  # rank 0 reports
    got = json.loads((tmp_path / "run" / "results.json").read_text())
    cfg = MFConfig(data=str(data), loss="softmax_ce", epochs=2, batch_size=200, dim=8, lr=0.05, progress=False)
    want = train_mf(cfg)
    assert got["world_size"] == 2 and want["world_size"] == 1
    assert_same_training({**got, "loss": [h["loss"] for h in got["history"]]},
                         {**want, "loss": [h["loss"] for h in want["history"]]}, "torchrun")


def test_one_process_without_a_group_is_the_functional_loss() -> None:
    """No process group: the sharded call is functional's (one shard = the whole catalogue)."""
    case = SHARD_CASES["softmax_ce_logq_weight_ignore"]
    x = {k: v.to(DTYPE).double() if v.is_floating_point() else v for k, v in global_inputs(case).items()}
    kw = call_kwargs(case, x, slice(None))
    q = x["query"].clone().requires_grad_()
    got = D.softmax_ce(q, x["table"], x["target"], **kw)
    want = single_process(case, x, torch.float64)
    got.backward()
    torch.testing.assert_close(got.detach(), want["loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.grad, want["query"], rtol=1e-12, atol=1e-12)
    neg, ids, lq = D.gather_negatives(x["table"], ids=x["ids"])
    assert neg is x["table"] and ids is x["ids"] and lq is None


def test_one_process_mixed_precision_is_the_functional_loss() -> None:
    """A bfloat16 query with a float32 table is computed and returned in float32, as functional does."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(6, DIM, generator=g).bfloat16().requires_grad_()
    table = torch.randn(ITEMS, DIM, generator=g).requires_grad_()
    target = torch.randint(0, ITEMS, (6,), generator=g)
    got = D.softmax_ce(q, table, target, label_smoothing=0.1, z_loss=0.01, backend="torch")
    got.backward()
    grads = q.grad.clone(), table.grad.clone()
    q.grad = table.grad = None
    want = F.softmax_ce(q, table, target, label_smoothing=0.1, z_loss=0.01, backend="torch")
    want.backward()
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], q.grad)
    torch.testing.assert_close(grads[1], table.grad, rtol=1e-5, atol=1e-6)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    rank_, worlds_, ports_, out_ = sys.argv[2:6]
    worker(int(rank_), [int(w) for w in worlds_.split(",")], [int(p) for p in ports_.split(",")], Path(out_))
