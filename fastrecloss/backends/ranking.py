"""Backends of :mod:`fastrecloss.ranking`: the reference (materialises R×I, the oracle), the chunked torch
path and the launcher of ``kernels/ranking.py``.

Every backend ranks the same scores s_rj = <q_r, v_j>/τ accumulated in fp32 (fp64 for fp64 inputs in the
reference and torch rank paths), excludes the same items (the row's target and its CSR list) and orders
top-k lists by the same int64 key (:func:`rank_key`: score descending, then item id ascending).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .._spec import acc_dtype
from ..kernels.config import MAX_TOPK  # noqa: F401 - the widest top-k of the kernel ("auto" falls back beyond)

TILE_ELEMENTS = 1 << 22  # torch backend: one fp32 [rows, items] score tile of 16 MiB, reused
CHUNK_ROWS = 256
_LOW = 0xFFFFFFFF


@dataclass
class RankProblem:
    """Validated inputs: ``target`` [R] int64 (None for top-k), ``ex_ptr`` [R + 1] / ``ex_idx`` [nnz]
    int64 with every row's list sorted (None without exclusions)."""

    query: Tensor
    table: Tensor
    target: Tensor | None
    ex_ptr: Tensor | None
    ex_idx: Tensor | None
    temperature: float
    ties_by_index: bool = False
    k: int | None = None

    @property
    def R(self) -> int:
        return self.query.shape[0]

    @property
    def num_items(self) -> int:
        return self.table.shape[0]


def sort_exclusions(indptr: Tensor, indices: Tensor, num_items: int) -> tuple[Tensor, Tensor]:
    """(indptr, indices) as int64 with each row's indices sorted (no host synchronisation)."""
    indptr, indices = indptr.to(torch.int64), indices.to(torch.int64)
    rows = entry_rows(indptr, indices.numel())
    keys = torch.sort(rows * num_items + indices).values
    return indptr.contiguous(), keys - rows * num_items


def entry_rows(indptr: Tensor, nnz: int) -> Tensor:
    """The row of every CSR entry, [nnz]."""
    return torch.searchsorted(indptr[1:], torch.arange(nnz, device=indptr.device), right=True)


def rank_key(s: Tensor, cols: Tensor) -> Tensor:
    """int64 keys ordered as (fp32 score descending, id ascending), as ``kernels/ranking.py``'s. −0.0 is
    folded to +0.0 first (their bits differ, the scores tie: by id), as the kernel's fp32 accumulator does."""
    bits = (s.to(torch.float32) + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) | (_LOW - cols)


def key_scores(keys: Tensor) -> Tensor:
    """The fp32 scores of :func:`rank_key` keys."""
    ordered = (keys >> 32).to(torch.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)


def decode_keys(keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(scores fp32, ids int64) of the k best keys of each row; −inf scores (no item) get id −1."""
    keys = torch.sort(keys, dim=1, descending=True).values[:, :k]
    scores = key_scores(keys)
    ids = _LOW - (keys & _LOW)
    empty = (keys == -(2**63)) | (scores == -math.inf)
    return scores.masked_fill(empty, -math.inf), ids.masked_fill(empty, -1)


# ------------------------------------------------------------------------------------------------
# reference


def _reference_scores(p: RankProblem) -> tuple[Tensor, Tensor]:
    """(S, S with the exclusions at −inf), both [R, I] — materialised on purpose."""
    acc = acc_dtype(p.query.dtype)
    scores = (p.query.to(acc) @ p.table.to(acc).T) / p.temperature
    masked = scores.clone()
    if p.ex_idx is not None and p.ex_idx.numel():
        masked[entry_rows(p.ex_ptr, p.ex_idx.numel()), p.ex_idx] = -math.inf
    return scores, masked


def reference_rank(p: RankProblem) -> Tensor:
    scores, masked = _reference_scores(p)
    rows = torch.arange(p.R, device=scores.device)
    s_t = scores[rows, p.target].unsqueeze(1)
    masked[rows, p.target] = -math.inf
    ahead = masked > s_t
    if p.ties_by_index:
        ahead |= (masked == s_t) & (torch.arange(p.num_items, device=scores.device) < p.target.unsqueeze(1))
    return ahead.sum(dim=1)


def reference_topk(p: RankProblem) -> tuple[Tensor, Tensor]:
    _, masked = _reference_scores(p)
    if p.k > p.num_items:  # fewer items than k: the rest of the list is "no item"
        masked = torch.cat([masked, masked.new_full((p.R, p.k - p.num_items), -math.inf)], dim=1)
    values, ids = torch.sort(masked.to(torch.float32), dim=1, descending=True, stable=True)
    values, ids = values[:, : p.k], ids[:, : p.k]
    return values, ids.masked_fill(values == -math.inf, -1)


# ------------------------------------------------------------------------------------------------
# torch (chunked): one [rows, items] tile buffer, never R×I


def _chunk_exclusions(p: RankProblem, r0: int, r1: int, width: int) -> tuple[Tensor, Tensor, list[int]] | None:
    """The chunk's excluded (local row, item) pairs sorted by item, and where each item tile's start."""
    if p.ex_idx is None:
        return None
    lo, hi = int(p.ex_ptr[r0]), int(p.ex_ptr[r1])
    cols, order = torch.sort(p.ex_idx[lo:hi], stable=True)
    rows = entry_rows(p.ex_ptr[r0 : r1 + 1] - lo, hi - lo)[order]
    starts = torch.arange(0, p.num_items + width, width, device=cols.device)
    return rows, cols, torch.searchsorted(cols, starts).tolist()


def _scale(s: Tensor, temperature: float) -> Tensor:
    """``s`` · (1/τ) in place: the one scaling of every torch-path score (the kernel's ``inv_tau`` too)."""
    return s.mul_(1.0 / temperature) if temperature != 1.0 else s


def _chunks(p: RankProblem, acc: torch.dtype) -> Iterator[tuple[int, int, Tensor, Iterator[tuple[Tensor, Tensor]]]]:
    """Row chunks (r0, r1, q in ``acc``, tiles): ``tiles`` yields (s [rows, width], item ids) for the
    chunk, the scores in one reused buffer with the exclusions at −inf."""
    chunk = max(1, min(p.R, CHUNK_ROWS))
    width = max(1, min(p.num_items, TILE_ELEMENTS // chunk))
    buf = torch.empty(chunk * width, dtype=acc, device=p.query.device)

    def tiles(r0: int, r1: int, q: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        ex = _chunk_exclusions(p, r0, r1, width)
        for t, t0 in enumerate(range(0, p.num_items, width)):
            t1 = min(p.num_items, t0 + width)
            s = torch.mm(q, p.table[t0:t1].to(acc).T, out=buf[: (r1 - r0) * (t1 - t0)].view(r1 - r0, t1 - t0))
            _scale(s, p.temperature)
            if ex is not None and ex[2][t + 1] > ex[2][t]:
                part = slice(ex[2][t], ex[2][t + 1])
                s[ex[0][part], ex[1][part] - t0] = -math.inf
            yield s, torch.arange(t0, t1, device=s.device)

    for r0 in range(0, p.R, chunk):
        r1 = min(p.R, r0 + chunk)
        q = p.query[r0:r1].to(acc)
        yield r0, r1, q, tiles(r0, r1, q)


def torch_rank(p: RankProblem) -> Tensor:
    acc = acc_dtype(p.query.dtype)
    out = torch.empty(p.R, dtype=torch.int64, device=p.query.device)
    for r0, r1, q, tiles in _chunks(p, acc):
        target = p.target[r0:r1]
        # the targets' scores from the same kind of GEMM as the tiles (a CPU GEMM may still round an equal vector
        # differently at another column, the reference's too: exact ties are certain for exact products only)
        # and the same scaling by 1/τ (x·(1/τ) and x/τ can differ in the last bit: a tie would break)
        s_t = _scale((q @ p.table[target].to(acc).T).diagonal().unsqueeze(1), p.temperature)
        cnt = torch.zeros(r1 - r0, dtype=torch.int64, device=q.device)
        for s, cols in tiles:
            inside = (target >= cols[0]) & (target <= cols[-1])
            s[inside.nonzero().squeeze(1), target[inside] - cols[0]] = -math.inf
            ahead = s > s_t
            if p.ties_by_index:
                ahead |= (s == s_t) & (cols < target.unsqueeze(1))
            cnt += ahead.sum(dim=1)
        out[r0:r1] = cnt
    return out


def torch_topk(p: RankProblem) -> tuple[Tensor, Tensor]:
    chunks = []
    for *_, q, tiles in _chunks(p, torch.float32):
        best = torch.full((q.shape[0], 0), -(2**63), dtype=torch.int64, device=q.device)
        for s, cols in tiles:
            if best.shape[1] == p.k:  # only the items that can enter some row's list: score ≥ its k-th best
                hot = (s >= key_scores(best[:, -1:])).any(dim=0)
                s, cols = s[:, hot], cols[hot]
            cand = torch.cat([best, rank_key(s, cols)], dim=1)
            best = torch.topk(cand, min(p.k, cand.shape[1]), dim=1).values
        chunks.append(best)
    keys = torch.cat(chunks) if chunks else torch.empty(0, p.k, dtype=torch.int64, device=p.query.device)
    if keys.shape[1] < p.k:  # k > I: pad with "no item"
        keys = torch.cat([keys, keys.new_full((keys.shape[0], p.k - keys.shape[1]), -(2**63))], dim=1)
    return decode_keys(keys, p.k)


# ------------------------------------------------------------------------------------------------
# triton


def plan(p: RankProblem, emulate_dot: bool):
    """The single launch of ``ranking_kernel`` for ``p`` and its output (ranks [R] or keys [R, width])."""
    import triton
    import triton.language as tl

    from ..kernels.config import ranking_config, topk_width
    from ..kernels.ranking import ranking_kernel
    from .triton_plan import _DOT_DTYPES, Launch, _bind

    cfg = ranking_config(p.query.shape[1], p.query.dtype, p.k)
    dev = p.query.device
    topk = p.k is not None
    rank = torch.empty(p.R, dtype=torch.int64, device=dev) if not topk else None
    width = topk_width(p.k) if topk else 1
    keys = torch.empty(p.R, width, dtype=torch.int64, device=dev) if topk else None
    args = dict(Q=p.query, TABLE=p.table, TARGET=p.target, EX_PTR=p.ex_ptr, EX_IDX=p.ex_idx, OUT_RANK=rank,
                OUT_KEYS=keys, R=p.R, N_ITEMS=p.num_items, d=p.query.shape[1], stride_qr=p.query.stride(0),
                stride_qd=p.query.stride(1), stride_tr=p.table.stride(0), stride_td=p.table.stride(1),
                inv_tau=1.0 / p.temperature, TOPK=topk, HAS_EX=p.ex_idx is not None, TIES_BY_INDEX=p.ties_by_index,
                K_PAD=width, BLOCK_R=cfg.block_r, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                DOT_DT=_DOT_DTYPES.get(p.query.dtype, tl.float32), EMULATE_DOT=emulate_dot, D_LOOP=cfg.block_dk > 0,
                BLOCK_DK=cfg.block_dk or 16, EVEN_K=not cfg.block_dk or p.query.shape[1] % cfg.block_dk == 0)
    launch = Launch(ranking_kernel, (max(1, triton.cdiv(p.R, cfg.block_r)),), _bind(ranking_kernel, args), cfg)
    return launch, (rank if not topk else keys)


def _run_triton(p: RankProblem) -> Tensor:
    from .triton import check_tensor_device, interpreting

    check_tensor_device(p.query)
    launch, out = plan(p, emulate_dot=interpreting())
    if p.R:
        with torch.cuda.device(p.query.device) if p.query.is_cuda else contextlib.nullcontext():
            launch.run()
    return out


def triton_rank(p: RankProblem) -> Tensor:
    return _run_triton(p)


def triton_topk(p: RankProblem) -> tuple[Tensor, Tensor]:
    return decode_keys(_run_triton(p), p.k)


def aot_cases() -> list[tuple[str, list]]:
    """(label, [launch]) of every configuration ``kernels.config.ranking_config`` gives for the AOT shapes,
    planned on meta tensors with exclusions on (for ``fastrecloss/backends/triton_aot.py``)."""
    from ..kernels.config import AOT_D, AOT_D_SHARED_LOOP, AOT_DTYPES, TOPK_WIDTHS, register_d

    R, n_items, nnz = 256, 4096, 1024
    out = []
    for d in AOT_D + AOT_D_SHARED_LOOP:  # d in registers, or the K loop over d
        for dtype in AOT_DTYPES:
            if d in AOT_D and d > register_d(dtype):
                continue
            for k in (None, *TOPK_WIDTHS):
                meta = {"device": "meta"}
                p = RankProblem(torch.empty(R, d, dtype=dtype, **meta), torch.empty(n_items, d, dtype=dtype, **meta),
                                torch.empty(R, dtype=torch.int64, **meta) if k is None else None,
                                torch.empty(R + 1, dtype=torch.int64, **meta),
                                torch.empty(nnz, dtype=torch.int64, **meta), 0.5, k is None, k)
                name = "rank" if k is None else f"topk k={k}"
                out.append((f"ranking {name} {str(dtype).removeprefix('torch.')} d={d}", [plan(p, False)[0]]))
    return out
