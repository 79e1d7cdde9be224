"""Losses over a catalogue — or a shared pool of negatives — sharded by rows across ranks.

Rank k holds rows [start_k, stop_k) of the item table (``neg`` / ``table_shard``) and reduces
them with the fused primitive :func:`fastrecloss.functional.sampled_logsumexp` to per-row
statistics: the shard's log-sum-exp, its count of unmasked negatives and, where the positive is a
table row, the positive's score on the shard that owns it. Two all-reduces merge them (max; then
the sum of the rescaled sum-exps, positive scores and counts — and, with label smoothing, the
shards' score sums — in float64), so O(R) numbers cross the wire whatever the catalogue size, and
every rank finishes with the same per-row loss.

Gradients follow the replicated-loss convention (Megatron's vocab-parallel cross-entropy): every
rank holds the same loss and backpropagates the same upstream gradient; ∂query (and ∂pos,
∂weight) is complete on every rank (each rank's shard part is summed by an all-reduce in the
backward), ∂neg is the local shard's only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from .._ops import divide_by_temperature, reduce_rows
from .._problem import (
    REDUCTIONS,
    _check_float,
    _check_shape,
    _promote,
    as_index,
    check_choice,
    check_ignore_index,
    check_temperature,
    check_weight,
)
from .._spec import acc_dtype, contrastive, result_dtype
from ._comm import (
    Group,
    agreed,
    code_float,
    dtype_code,
    exchange,
    float_code,
    max_over_ranks,
    resolve_group,
    sum_grad_over_ranks,
    sum_over_ranks,
    temperature_code,
    temperature_value,
)

_KNOBS = ("eps", "lam", "mu", "label_smoothing", "z_loss")  # the LossSpec hyper-parameters, as float64 bits
_ROW = ("R", "d", "N", "start", "stop", "has_shard", "dtype", "log_q", "mask", "pos", "pos_idx", "hits",
        "pos_log_q", "weight", "qgrad", "reduction", "temperature", *_KNOBS, "tmin", "tmax", "tsum", "tcount")
_COL = {name: i for i, name in enumerate(_ROW)}
_SAME = {"R": "the number of rows R (query.shape[0]; per-row arguments are replicated)",
         "d": "d (query.shape[1])", "has_shard": "whether shard= is given", "dtype": "the query's dtype (as a code)",
         "log_q": "whether log_q is given", "mask": "neg_mask's kind (0 none, 1 [N], 2 [R, N])",
         "pos": "whether pos is given", "pos_idx": "whether the positive is a table row",
         "hits": "remove_accidental_hits", "pos_log_q": "whether pos_log_q is given",
         "weight": "whether weight is given",
         "qgrad": "whether the query needs a gradient (its backward all-reduces ∂query)",
         "reduction": "reduction (as a code)"}
_SAME_FLOATS = ("temperature", *_KNOBS)  # replicated hyper-parameters: a mismatch would be a different loss per rank


def unmasked_counts(R: int, N: int, neg_mask: Tensor | None, hit_pos: Tensor | None, hit_neg: Tensor | None,
                    device: torch.device) -> Tensor:
    """n_r of this shard: negatives neither masked nor an accidental hit, int64 [R], without an R×N
    intermediate unless ``neg_mask`` is already [R, N]."""
    keep = None if neg_mask is None else ~neg_mask
    if keep is None:
        n = torch.full((R,), N, dtype=torch.int64, device=device)
    else:
        n = keep.sum(dim=-1).to(torch.int64).expand(R) if keep.dim() == 1 else keep.sum(dim=1).to(torch.int64)
    if hit_pos is None:
        return n
    if keep is not None and keep.dim() == 2:
        return n - ((hit_pos[:, None] == hit_neg[None, :]) & keep).sum(dim=1)
    ids, order = hit_neg.sort()
    kept = torch.ones_like(ids) if keep is None else keep[order].to(torch.int64)
    cum = torch.cat([kept.new_zeros(1), kept.cumsum(0)])
    lo, hi = torch.searchsorted(ids, hit_pos), torch.searchsorted(ids, hit_pos, right=True)
    return n - (cum[hi] - cum[lo])


def check_shards(rows: list[list[int]]) -> tuple[list[int], int]:
    """Each rank's start and the catalogue size; a ValueError if given shards overlap or leave a gap."""
    sizes = [r[_COL["N"]] for r in rows]
    if not rows[0][_COL["has_shard"]]:
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        return starts, sum(sizes)
    spans = [(r[_COL["start"]], r[_COL["stop"]]) for r in rows]
    total = max(stop for _, stop in spans)
    prev: tuple[int, int, int] | None = None  # (start, stop, rank) of the shard that ends highest so far
    for start, stop, k in sorted((a, b, k) for k, (a, b) in enumerate(spans) if b > a):  # empty shards hold nothing
        covered = 0 if prev is None else prev[1]
        if start < covered:
            raise ValueError(f"shards overlap: rank {prev[2]} holds [{prev[0]}, {prev[1]}) and rank {k} holds "
                             f"[{start}, {stop}); give every catalogue row to exactly one rank")
        if start > covered:
            raise ValueError(f"shards do not cover the catalogue: rows [{covered}, {start}) are on no rank "
                             f"(shards in rank order: {[list(s) for s in spans]})")
        prev = (start, stop, k)
    return [s[0] for s in spans], total


def _local_row(values: dict[str, int]) -> list[int]:
    return [int(values.get(name, 0)) for name in _ROW]


def score_sums(q: Tensor, neg: Tensor, log_q: Tensor | None, neg_mask: Tensor | None, temperature: float,
               acc: torch.dtype) -> Tensor:
    """Σ_j s_rj over this shard's unmasked items [R] (label smoothing's mean), without an R×N score matrix."""
    keep = None if neg_mask is None else (~neg_mask).to(acc)
    vecs = neg.to(acc).sum(dim=0) if keep is None else keep @ neg.to(acc)  # [d] or [R, d]
    s = (q.to(acc) * vecs).sum(dim=-1) / temperature if vecs.dim() == 2 else q.to(acc) @ vecs / temperature
    if log_q is not None:
        s = s - (log_q.to(acc).sum() if keep is None else keep @ log_q.to(acc))
    return s


def sharded_loss(name: str, knobs: dict[str, float], query: Tensor, pos: Tensor | None, neg: Tensor, *,
                 need_pos: bool = True, target_name: str = "pos_idx", shard: tuple[int, int] | None = None,
                 group: Any = None, pos_idx: Tensor | None = None, temperature: float | Tensor = 1.0,
                 log_q: Tensor | None = None, pos_log_q: Tensor | None = None, pos_ids: Tensor | None = None,
                 neg_ids: Tensor | None = None, remove_accidental_hits: bool = False, neg_mask: Tensor | None = None,
                 weight: Tensor | None = None, reduction: str = "mean", backend: str = "auto",
                 deterministic: bool = False, ignore_index: int = -100, check: bool = True,
                 **unsupported: Any) -> Tensor:
    """The contrastive family over a pool sharded across ranks (see the module doc); ``knobs`` are the
    :class:`~fastrecloss._spec.LossSpec` hyper-parameters (eps, lam, mu, label_smoothing, z_loss); errors
    name the public function ``name``."""
    g = resolve_group(group)
    state: dict[str, Any] = {}

    def local() -> list[int]:
        with F._named(name):
            return validate()

    def validate() -> list[int]:
        nonlocal query, pos, neg, pos_idx, temperature
        unknown = sorted(k for k in unsupported if not k.startswith("_") and k not in F.COMMON)
        if unknown:
            raise TypeError(f"got an unexpected keyword argument {unknown[0]!r}")
        if unsupported:
            names = ", ".join(sorted(k.lstrip("_") for k in unsupported))
            raise ValueError(f"{names}: not supported by the sharded losses (shared layout only: neg is this "
                             "rank's rows of the table or pool; no neg_idx, in_batch, per-row negatives)")
        state["spec"] = contrastive(**knobs)  # validated here, so a bad value fails on every rank
        check_choice("reduction", reduction, REDUCTIONS)
        _check_float("query", query, 2, "[R, d]")
        neg_name = "table_shard" if target_name == "target" else "neg"
        _check_float(neg_name, neg, 2, "[N_k, d] (this rank's rows of the table)")
        if pos is not None:
            _check_float("pos", pos, 2, "[R, d]")
        # a mix of float32 / bfloat16 / float16 is computed (and returned) in float32, as functional does
        query, pos, neg = _promote(query, pos, neg, {"neg": neg_name})
        temperature = check_temperature(temperature, query.device)
        row_tau = temperature_code(temperature)  # before a tensor τ is folded into the query
        if isinstance(temperature, Tensor):  # q/τ with τ = 1: ∂τ follows ∂query, complete on every rank
            query, temperature = divide_by_temperature(query, temperature), 1.0
        R, d = query.shape
        N = neg.shape[0]
        if neg.shape[1] != d or neg.dtype != query.dtype or neg.device != query.device:
            raise ValueError(f"{neg_name} must be [N_k, d = {d}] with the query's dtype {query.dtype} on "
                             f"{query.device}, got {tuple(neg.shape)} {neg.dtype} on {neg.device}")
        row: dict[str, int] = {"R": R, "d": d, "N": N, "dtype": dtype_code(query.dtype), "log_q": log_q is not None,
                               "pos": pos is not None,
                               "pos_idx": pos_idx is not None, "hits": bool(remove_accidental_hits),
                               "pos_log_q": pos_log_q is not None, "weight": weight is not None,
                               "qgrad": query.requires_grad and torch.is_grad_enabled()}
        if shard is not None:
            if (not isinstance(shard, (tuple, list)) or len(shard) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)):
                raise TypeError(f"shard must be a pair of ints (start, stop), got {shard!r}")
            if not 0 <= shard[0] <= shard[1] or shard[1] - shard[0] != N:
                raise ValueError(f"shard=({shard[0]}, {shard[1]}) must satisfy 0 <= start <= stop and hold "
                                 f"stop - start = {N} rows ({neg_name}.shape[0])")
            row.update(start=shard[0], stop=shard[1], has_shard=1)
        if pos is not None and pos_idx is not None:
            raise ValueError(f"pass either pos [R, d] or {target_name} [R], not both")
        if need_pos and pos is None and pos_idx is None:
            raise ValueError(f"this loss needs a positive: pass pos [R, d] or {target_name} [R]")
        if pos is not None and (pos.shape != query.shape or pos.dtype != query.dtype or pos.device != query.device):
            raise ValueError(f"pos must have the query's shape {tuple(query.shape)} and dtype {query.dtype} on "
                             f"{query.device}, got {tuple(pos.shape)} {pos.dtype} on {pos.device}")
        check_ignore_index(ignore_index)
        _check_shape(target_name, pos_idx, (R,), "[R] (global ids, the same on every rank)", kind="int",
                     device=query.device)
        _check_shape("pos_log_q", pos_log_q, (R,), "[R]", kind="float", device=query.device)
        check_weight(weight, R, query.device)
        if pos_idx is not None:
            pos_idx = as_index(pos_idx)
            valid = pos_idx != ignore_index if ignore_index is not None else torch.ones_like(pos_idx, dtype=torch.bool)
            t = pos_idx[valid]
            row.update(tcount=int(valid.sum()), tsum=int(t.sum()), tmin=int(t.min()) if t.numel() else 0,
                       tmax=int(t.max()) if t.numel() else 0)
            state["valid"] = valid
        hit_pos = (pos_ids if pos_ids is not None else pos_idx) if remove_accidental_hits else pos_ids
        q = sum_grad_over_ranks(query, g)
        # The fused primitive validates the per-item arguments (log_q, neg_mask, neg_ids: this shard's slice),
        # its errors naming this function and neg_name.
        state["lse"] = F.compute_loss(F.loss_spec("sampled_logsumexp"), q, None, neg, temperature=temperature,
                                      log_q=log_q, pos_ids=hit_pos, neg_ids=neg_ids,
                                      remove_accidental_hits=remove_accidental_hits, neg_mask=neg_mask,
                                      reduction="none", backend=backend, deterministic=deterministic,
                                      _need_pos=False, _name=name, _names={"neg": neg_name})
        row.update(temperature=row_tau, reduction=REDUCTIONS.index(reduction),
                   **{k: float_code(getattr(state["spec"], k)) for k in _KNOBS})
        row["mask"] = 0 if neg_mask is None else neg_mask.dim()  # a tensor of [N] or [R, N] by now
        state["n"] = unmasked_counts(R, N, neg_mask, hit_pos if remove_accidental_hits else None, neg_ids,
                                     query.device)
        state["q"] = q
        if state["spec"].label_smoothing:
            state["ssum"] = score_sums(q, neg, log_q, neg_mask, temperature, acc_dtype(query.dtype))
        return _local_row(row)

    device = query.device if isinstance(query, Tensor) else torch.device("cpu")
    if check:
        rows = exchange(g, local, len(_ROW), device)
        with F._named(name):
            start = _check_rows(rows, g, pos_idx is not None, target_name, ignore_index)
    else:
        if shard is None and g.world > 1:
            raise ValueError("check=False needs shard=(start, stop): the offsets come from the check otherwise")
        local()
        start = shard[0] if shard is not None else 0
    state["s_tab"] = _positive_on_shard(state, neg, pos_idx, start, temperature, log_q, pos_log_q)
    return _merge(g, state, need_pos, query, pos, temperature, pos_log_q, weight, reduction)


def _check_rows(rows: list[list[int]], g: Group, has_target: bool, target_name: str, ignore_index: int | None
                ) -> int:
    """Every rank's configuration row agrees and the shards tile the catalogue; this rank's start."""
    for column, what in _SAME.items():
        agreed(rows, _COL[column], what)
    for column in _SAME_FLOATS:
        agreed(rows, _COL[column], column, decode=temperature_value if column == "temperature" else code_float)
    starts, total = check_shards(rows)
    if has_target:
        for column in ("tmin", "tmax", "tsum", "tcount"):
            agreed(rows, _COL[column], f"{target_name} (per-row, replicated)")
        lo, hi = rows[0][_COL["tmin"]], rows[0][_COL["tmax"]]
        if rows[0][_COL["tcount"]] and (lo < 0 or hi >= total):
            raise ValueError(f"{target_name} has values in [{lo}, {hi}] outside every shard: the {g.world} "
                             f"shards cover the catalogue [0, {total}) (ignore_index={ignore_index} marks "
                             "ignored rows)")
    return starts[g.rank]


def _positive_on_shard(state: dict[str, Any], neg: Tensor, pos_idx: Tensor | None, start: int, temperature: float,
                       log_q: Tensor | None, pos_log_q: Tensor | None) -> Tensor:
    """s_r+ where row r's positive is a row of this shard (with its logQ⁺), 0 elsewhere."""
    q = state["q"]
    acc = acc_dtype(q.dtype)
    N = neg.shape[0]
    if pos_idx is None or N == 0:
        return torch.zeros(q.shape[0], dtype=acc, device=q.device)
    local = pos_idx - start
    own = (local >= 0) & (local < N) & state["valid"]
    safe = torch.where(own, local, 0)
    s = (q.to(acc) * neg[safe].to(acc)).sum(dim=1) / temperature
    if pos_log_q is None and log_q is not None:  # logq⁺: the positive's own correction (SPEC §2)
        s = s - log_q[safe].to(acc)
    return torch.where(own, s, 0.0)


def _merge(g: Group, state: dict[str, Any], need_pos: bool, query: Tensor, pos: Tensor | None,
           temperature: float, pos_log_q: Tensor | None, weight: Tensor | None, reduction: str) -> Tensor:
    acc = acc_dtype(query.dtype)
    q, n_k, knobs = state["q"], state["n"], state["spec"]
    # q[:, :0] keeps the backward's all-reduce of ∂query on every rank's graph even where the local
    # statistic does not depend on the query (an empty shard), so no rank skips that collective.
    lse_k = torch.where(n_k > 0, state["lse"].to(acc), -math.inf) + q[:, :0].sum(dim=1).to(acc)
    shift = max_over_ranks(lse_k, g)
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    parts = [torch.exp(lse_k - shift), state["s_tab"], n_k.to(acc), *([state["ssum"]] if "ssum" in state else [])]
    total, s_tab, n, *ssum = sum_over_ranks(torch.stack(parts).to(torch.float64), g).unbind(0)
    has_neg = n > 0
    lse = shift + torch.log(torch.where(total > 0, total, 1.0)).to(acc)
    if not need_pos:
        rows = torch.where(has_neg, lse, 0.0)
    else:
        s_pos = s_tab.to(acc) if pos is None else (query.to(acc) * pos.to(acc)).sum(dim=1) / temperature
        if pos_log_q is not None:
            s_pos = s_pos - pos_log_q.to(acc)
        log_term = lse if knobs.eps == 0 else torch.logaddexp(lse, s_pos + math.log(knobs.eps))
        loss = knobs.lam * (log_term - knobs.mu * torch.log(n.clamp(min=1)).to(acc)) + knobs.z_loss * log_term ** 2
        if ssum:  # α · (−mean of the unmasked candidates' scores), F.cross_entropy's label smoothing
            loss = loss - knobs.label_smoothing * (ssum[0] / n.clamp(min=1)).to(acc)
        rows = torch.where(has_neg, loss - (1 - knobs.label_smoothing) * s_pos, 0.0)
    if "valid" in state:  # an ignored target counts as weight 0 (SPEC §5)
        valid = state["valid"].to(acc)
        weight = valid if weight is None else weight.to(acc) * valid
    return reduce_rows(rows, weight, reduction).to(result_dtype(query.dtype, None, query.device))
