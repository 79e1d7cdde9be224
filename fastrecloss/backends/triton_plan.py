"""Plans the kernel launches for one problem: outputs, grids and every kernel argument by name.

:func:`plan` is pure bookkeeping (allocations and argument lists, no kernel runs, no host
synchronisation), so the same code feeds the runtime launcher (``fastrecloss.backends.triton``)
and the ahead-of-time compiler (``fastrecloss/backends/triton_aot.py``, which plans on meta tensors). It allocates
only the outputs ([R] losses, [R, d] query/positive gradients, the item gradient in the shape of
``neg``), the fp32 [4, R] row statistics when a later pass needs them (plus one float, the
largest row coefficient, for the shared item pass), the fp32 partials of a split shared rows pass
(small R: [S, 5, R] and [S, R, d] with S·R ≤ sm_count·BLOCK_R, see :func:`_plan_shared`), and, in
deterministic indexed mode, the int64 sort of the item references and the fp32
[2·⌈E/SEGMENT_CHUNK⌉, d] partial sums of the segments that cross chunks (``kernels/indexed.py``).

Passes over the negatives. Shared layout: the rows pass, plus the items pass for ∂/∂neg. Gathered
layouts (per-row, indexed): the forward is one state pass that can save the row statistics
(``save_state``, O(R) floats); the backward given them (``state``) is one gradient pass that
writes ∂/∂q, ∂/∂p and ∂/∂neg — two reads of the negatives per forward+backward. A plan with a row
scale and no saved state (the fused scalar op, direct calls) does both passes itself (one pass
when ∂neg is not wanted, unless d needs the K loop, whose state pass computes no gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._problem import Problem
from .._spec import Kind, LossSpec, acc_dtype
from ..kernels.config import (
    SEGMENT_CHUNK,
    SM_COUNT,
    TileConfig,
    gathered_block_d,
    gathered_config,
    lazy_rescale,
    merge_config,
    segment_config,
    shared_configs,
    split_count,
)
from ..kernels.indexed import item_segment_kernel, segment_merge_kernel
from ..kernels.per_row import rows_kernel
from ..kernels.shared import shared_items_kernel, shared_rows_kernel

_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass
class Launch:
    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]  # every parameter of the kernel by name (tensors, ints, floats, None, constexprs)
    config: TileConfig

    @property
    def name(self) -> str:
        """The kernel's name; the merge launch of a split shared rows pass is ``shared_rows_kernel:merge``."""
        return self.kernel.__name__ + (":merge" if self.args.get("MERGE") else "")

    def run(self) -> None:
        cfg = self.config
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if torch.version.hip is None:  # .maxnreg is a PTX directive (NVIDIA only)
            options["maxnreg"] = cfg.maxnreg
        self.kernel[self.grid](**self.args, **options)


@dataclass
class Plan:
    launches: list[Launch] = field(default_factory=list)
    loss: Tensor | None = None
    grad_q: Tensor | None = None
    grad_p: Tensor | None = None
    grad_neg: Tensor | None = None
    state: Tensor | None = None  # [4, R] fp32 row stats (shift, coef, g+, uni) saved by a gathered forward

    def outputs(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        return self.loss, self.grad_q, self.grad_p, self.grad_neg


def _flat(t: Tensor | None) -> Tensor | None:
    """1-D side inputs ([R] or [N]/[I]) are made contiguous (O(R + N) at most); bool → uint8 view."""
    if t is None:
        return None
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.contiguous() if t.dim() == 1 else t


def _strides(t: Tensor | None, n: int = 2) -> tuple[int, ...]:
    if t is None:
        return (0,) * n
    return tuple(t.stride()) + (0,) * (n - t.dim())


def _loss_args(p: Problem, spec: LossSpec) -> dict[str, Any]:
    kind = int(spec.kind)
    has_eps = kind == Kind.CONTRASTIVE and p.has_pos and spec.eps > 0
    return dict(
        inv_tau=1.0 / p.temperature, log2_eps=math.log2(spec.eps) if has_eps else 0.0, lam=float(spec.lam),
        smooth=float(spec.label_smoothing), z_loss=float(spec.z_loss), SMOOTH=spec.label_smoothing > 0,
        mu=float(spec.mu), beta=float(spec.beta), margin=float(spec.margin), neg_weight=float(spec.neg_weight),
        KIND=kind, HAS_POS=p.has_pos, POS_FROM_TABLE=p.pos_idx is not None, HAS_EPS=has_eps,
        HAS_LOG_Q=p.log_q is not None, HAS_POS_LOG_Q=p.pos_log_q is not None, HAS_HITS=p.hit_pos_ids is not None,
        NEG_SUM=bool(spec.neg_sum),
    )


def plan(p: Problem, spec: LossSpec, row_scale: Tensor | None, needs: tuple[bool, bool, bool],
         deterministic: bool, emulate_dot: bool, state: Tensor | None = None, save_state: bool = False,
         arch: int = 90, sm_count: int = SM_COUNT, splits: int | None = None) -> Plan:
    """Allocate the outputs of ``forward_backward`` and list the launches that fill them.

    Gathered layouts only: ``save_state`` makes a forward (no ``row_scale``) also return the [4, R]
    row stats in ``Plan.state``; ``state`` (with ``row_scale``) plans the backward's gradient pass
    alone, which computes no loss. ``emulate_dot``: the kernels run in the interpreter. ``arch``: the
    GPU's compute capability (×10), for the per-arch tiles of ``kernels/config.py``. Shared layout:
    ``sm_count`` (the GPU's SMs) decides whether the rows pass splits the items (small R, see
    :func:`_plan_shared`); ``splits`` forces the number of splits (a test hook)."""
    acc = acc_dtype(p.query.dtype)
    R, d, dev = p.R, p.d, p.query.device
    need_q, need_p, need_n = needs if row_scale is not None else (False, False, False)
    need_p = need_p and p.pos is not None
    gathered = p.layout != "shared"
    if not gathered and (state is not None or save_state):
        raise ValueError("saved row stats are for the per-row and indexed layouts")
    out = Plan(loss=torch.empty(R, dtype=acc, device=dev) if state is None else None)
    out.grad_q = torch.empty(R, d, dtype=acc, device=dev) if need_q else None
    out.grad_p = torch.empty(R, d, dtype=acc, device=dev) if need_p else None
    if need_n:  # the shared item pass and the per-row pass write every element; the indexed ones add
        alloc = torch.zeros if (p.layout == "indexed" or R == 0) else torch.empty
        # a gradient pass from saved stats is final (its row scale is the upstream gradient): the
        # per-row ∂neg is written once, in the input dtype
        dtype = p.neg.dtype if (state is not None and p.layout == "per_row") else acc
        out.grad_neg = alloc(tuple(p.neg.shape), dtype=dtype, device=dev)
    # a state pass, then the gradient pass; with a K loop over d (large d) the state pass computes no gradient
    d_loop = gathered and gathered_block_d(d) < d
    two_pass = gathered and state is None and (need_n or (d_loop and (need_q or need_p)))
    if save_state or two_pass or (not gathered and need_n):
        out.state = torch.empty(4, R, dtype=torch.float32, device=dev)
    if R == 0:
        return out
    stats = state if state is not None else out.state
    row_stats = list(stats) if stats is not None else [None] * 4
    side = {name: _flat(getattr(p, name.lower())) for name in ("POS_IDX", "LOG_Q", "POS_LOG_Q", "NEG_MASK")}
    hit_pos, hit_neg = _flat(p.hit_pos_ids), _flat(p.hit_neg_ids)
    common = dict(
        Q=p.query, NEG=p.neg, POS=p.pos, POS_IDX=side["POS_IDX"], LOG_Q=side["LOG_Q"], POS_LOG_Q=side["POS_LOG_Q"],
        MASK=side["NEG_MASK"], HIT_POS=hit_pos, HIT_NEG=hit_neg, ROW_SCALE=_flat(row_scale), LOSS=out.loss,
        GRAD_Q=out.grad_q, GRAD_P=out.grad_p, GRAD_NEG=out.grad_neg, ROW_SHIFT=row_stats[0],
        ROW_COEF=row_stats[1], ROW_GPOS=row_stats[2], ROW_UNI=row_stats[3], R=R, N=p.N, d=d,
        stride_qr=p.query.stride(0), stride_qd=p.query.stride(1), stride_pr=_strides(p.pos)[0],
        stride_pd=_strides(p.pos)[1], NEED_GQ=need_q, NEED_GP=need_p, INTERPRET=emulate_dot, **_loss_args(p, spec),
    )
    if p.layout == "shared":
        _plan_shared(out, p, dict(common, SAVE_STATS=need_n), arch, sm_count, splits)
    elif state is not None:
        _plan_gathered(out, p, common, deterministic, "gradient")
    elif two_pass:
        _plan_gathered(out, p, dict(common, GRAD_Q=None, GRAD_P=None, NEED_GQ=False, NEED_GP=False), deterministic,
                       "state")
        _plan_gathered(out, p, dict(common, LOSS=None), deterministic, "gradient")
    else:
        _plan_gathered(out, p, common, deterministic, "state")
    return out


def _bind(kernel: Any, args: dict[str, Any]) -> dict[str, Any]:
    """The kernel's parameters picked from ``args`` (all must be present)."""
    missing = [name for name in kernel.arg_names if name not in args]
    if missing:
        raise RuntimeError(f"{kernel.__name__}: no value planned for {missing}")
    return {name: args[name] for name in kernel.arg_names}


def hit_codes(pos_ids: Tensor, neg_ids: Tensor) -> tuple[Tensor, Tensor]:
    """int32 codes of the shared layout's accidental-hit ids: code_pos[r] == code_neg[j] exactly when
    pos_ids[r] == neg_ids[j] (the rank of the id among the sorted negative ids; −1 for a positive id
    no negative has). The kernels then compare 32-bit codes per score instead of 64-bit ids (half
    the registers and integer instructions of the per-(row, item) test). O(R + N) torch ops, no
    host synchronisation."""
    sorted_neg = torch.sort(neg_ids.to(torch.int64)).values
    code_neg = torch.searchsorted(sorted_neg, neg_ids.to(torch.int64)).to(torch.int32)
    pos = pos_ids.to(torch.int64)
    code_pos = torch.searchsorted(sorted_neg, pos).clamp(max=max(neg_ids.numel() - 1, 0))
    present = sorted_neg[code_pos] == pos
    return torch.where(present, code_pos, -1).to(torch.int32), code_neg


def _plan_shared(out: Plan, p: Problem, common: dict[str, Any], arch: int, sm_count: int,
                 splits: int | None) -> None:
    """The rows pass, then the items pass for ∂/∂neg. With at most half as many row blocks as SMs
    the rows pass is split (flash-decoding, ``config.split_count``): grid (row blocks, S), each
    program streaming its share of the item tiles into fp32 partials (``WS`` [S, 5, R], ``WS_ACC`` /
    ``WS_VSUM`` [S, R, d]: O(S·R·d)), then the same kernel with MERGE finishes the rows. With a K loop
    over d (``D_LOOP``, d beyond the register tile) every grid gains an axis of output chunks (the
    rows pass's third, the items pass's second), counted with the row blocks when choosing S."""
    pairs = common["HAS_HITS"] or (common["MASK"] is not None and common["MASK"].dim() == 2)
    rows_cfg, items_cfg = shared_configs(p.d, p.query.dtype, smooth=common["SMOOTH"], pairs=pairs, arch=arch)
    if common["HIT_POS"] is not None and p.N > 0:
        common = dict(common, **dict(zip(("HIT_POS", "HIT_NEG"), hit_codes(common["HIT_POS"], common["HIT_NEG"]))))
    mask = common["MASK"]
    mask_mode = 0 if mask is None else mask.dim()
    stride_mr, stride_mn = (0, mask.stride(0)) if mask_mode == 1 else _strides(mask)
    dev = p.query.device
    coef_max = torch.zeros(1, dtype=torch.float32, device=dev) if out.grad_neg is not None else None
    d_loop = rows_cfg.block_dk > 0  # a K loop over d: one program per output chunk of BLOCK_D columns
    args = dict(common, COEF_MAX=coef_max, stride_nn=p.neg.stride(0), stride_nd=p.neg.stride(1),
                stride_mr=stride_mr, stride_mn=stride_mn, MASK_MODE=mask_mode, BLOCK_D=rows_cfg.block_d,
                DOT_DT=_DOT_DTYPES.get(p.query.dtype, tl.float32), SPLIT=False, MERGE=False, split_n=p.N,
                n_splits=1, WS=None, WS_ACC=None, WS_VSUM=None,
                LAZY_TH=lazy_rescale(common["KIND"], p.query.dtype, rows_cfg), D_LOOP=d_loop,
                BLOCK_DK=rows_cfg.block_dk or 16, EVEN_K=not d_loop or p.d % rows_cfg.block_dk == 0)

    def grid(blocks: int, cfg: TileConfig, splits: int = 1) -> tuple[int, ...]:
        """1-D (or (blocks, S) when split) without a K loop; (blocks, S, output chunks) with one."""
        if d_loop:
            return blocks, splits, triton.cdiv(p.d, cfg.block_d)
        return (blocks,) if splits == 1 else (blocks, splits)

    row_blocks = triton.cdiv(p.R, rows_cfg.block_r)  # (× the output chunks of a K loop: programs per item range)
    n_splits, per_split = split_count(row_blocks * math.prod(grid(1, rows_cfg)), triton.cdiv(p.N, rows_cfg.block_n),
                                      sm_count, splits)
    rows = dict(args, BLOCK_R=rows_cfg.block_r, BLOCK_N=rows_cfg.block_n)
    if n_splits == 1:
        out.launches.append(Launch(shared_rows_kernel, grid(row_blocks, rows_cfg), _bind(shared_rows_kernel, rows),
                                   rows_cfg))
    else:
        ws = dict(WS=torch.empty(n_splits, 5, p.R, dtype=torch.float32, device=dev), WS_ACC=None, WS_VSUM=None)
        if common["NEED_GQ"]:
            ws["WS_ACC"] = torch.empty(n_splits, p.R, p.d, dtype=torch.float32, device=dev)
            if common["SMOOTH"]:
                ws["WS_VSUM"] = torch.empty(n_splits, p.R, p.d, dtype=torch.float32, device=dev)
        rows = dict(rows, **ws, SPLIT=True, split_n=per_split * rows_cfg.block_n)
        out.launches.append(Launch(shared_rows_kernel, grid(row_blocks, rows_cfg, n_splits),
                                   _bind(shared_rows_kernel, rows), rows_cfg))
        merge_cfg = merge_config(p.d, p.query.dtype)
        merge = dict(rows, MERGE=True, SPLIT=False, n_splits=n_splits, BLOCK_R=merge_cfg.block_r,
                     BLOCK_N=merge_cfg.block_n, BLOCK_D=merge_cfg.block_d, BLOCK_DK=merge_cfg.block_dk or 16)
        out.launches.append(Launch(shared_rows_kernel, grid(triton.cdiv(p.R, merge_cfg.block_r), merge_cfg),
                                   _bind(shared_rows_kernel, merge), merge_cfg))
    if out.grad_neg is not None and p.N > 0:
        items = dict(args, BLOCK_R=items_cfg.block_r, BLOCK_N=items_cfg.block_n, BLOCK_D=items_cfg.block_d)
        item_grid = grid(triton.cdiv(p.N, items_cfg.block_n), items_cfg)
        out.launches.append(Launch(shared_items_kernel, item_grid[:1] + item_grid[2:],
                                   _bind(shared_items_kernel, items), items_cfg))


def _plan_gathered(out: Plan, p: Problem, common: dict[str, Any], deterministic: bool, mode: str) -> None:
    """One row pass: ``mode`` "state" (loss, row stats) or "gradient" (from the stats in ``common``),
    and the deterministic item-segment pass after a gradient pass that needs ∂/∂neg."""
    indexed = p.layout == "indexed"
    cfg = gathered_config(p.d, p.N)
    gradient = mode == "gradient"
    need_n = gradient and out.grad_neg is not None
    in_kernel = need_n and not (indexed and deterministic)  # the row pass writes / atomically adds ∂/∂v
    log_q = common["LOG_Q"]
    if indexed:
        layout = dict(stride_nr=p.neg.stride(0), stride_nn=0, stride_nd=p.neg.stride(1),
                      stride_lr=_strides(log_q, 1)[0], stride_ln=0)
        stride_ir, stride_in = p.neg_idx.stride()
    else:
        layout = dict(stride_nr=p.neg.stride(0), stride_nn=p.neg.stride(1), stride_nd=p.neg.stride(2),
                      stride_lr=_strides(log_q)[0], stride_ln=_strides(log_q)[1])
        stride_ir = stride_in = 0
    (stride_mr, stride_mn), (stride_hr, stride_hn) = _strides(common["MASK"]), _strides(common["HIT_NEG"])
    args = dict(common, **layout, IDX=p.neg_idx, n_table=p.neg.shape[0], stride_ir=stride_ir, stride_in=stride_in,
                stride_mr=stride_mr, stride_mn=stride_mn, stride_hr=stride_hr, stride_hn=stride_hn, INDEXED=indexed,
                HAS_MASK=p.neg_mask is not None, NEED_GN=in_kernel, FROM_STATS=gradient,
                SAVE_STATS=not gradient and common["ROW_SHIFT"] is not None,
                SCATTER_POS=in_kernel and indexed and p.pos_idx is not None,
                BLOCK_R=cfg.block_r, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, D_LOOP=cfg.block_d < p.d)
    if not in_kernel:
        args["GRAD_NEG"] = None
    if gradient:
        args["LOSS"] = None
    out.launches.append(Launch(rows_kernel, (triton.cdiv(p.R, cfg.block_r),), _bind(rows_kernel, args), cfg))
    if need_n and not in_kernel:
        _plan_segments(out, p, dict(args, GRAD_NEG=out.grad_neg))


def _plan_segments(out: Plan, p: Problem, rows: dict[str, Any]) -> None:
    """Deterministic item gradient of the indexed layout (see ``kernels/indexed.py``): the piece pass
    over chunks of SEGMENT_CHUNK sorted references, then the merge of the segments that cross chunks.
    The fp32 workspace is 2 slots per chunk, [2·⌈E/CHUNK⌉, d]: sized from E alone, no host sync."""
    keys = p.neg_idx.reshape(-1).to(torch.int64)
    if p.pos_idx is not None:
        keys = torch.cat([keys, p.pos_idx.to(torch.int64)])
    E = keys.numel()
    if E == 0:
        return
    sorted_keys, order = torch.sort(keys, stable=True)
    seg_end = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    cfg = segment_config(p.d)
    n_chunks = triton.cdiv(E, SEGMENT_CHUNK)
    partial = torch.empty(2 * n_chunks, p.d, dtype=torch.float32, device=p.query.device)
    args = dict(rows, SORTED_KEYS=sorted_keys, ORDER=order, SEG_END=seg_end, PARTIAL=partial, E=E, RN=p.R * p.N,
                N_DIV=max(p.N, 1), stride_l=rows["stride_lr"], n_chunks=n_chunks, CHUNK=SEGMENT_CHUNK,
                BLOCK_E=cfg.block_r, BLOCK_C=cfg.block_r, BLOCK_D=cfg.block_d, D_LOOP=cfg.block_d < p.d)
    out.launches.append(Launch(item_segment_kernel, (triton.cdiv(E, cfg.block_r),), _bind(item_segment_kernel, args),
                               cfg))
    out.launches.append(Launch(segment_merge_kernel, (triton.cdiv(n_chunks, cfg.block_r),),
                               _bind(segment_merge_kernel, args), cfg))
