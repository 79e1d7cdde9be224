"""Launch configurations: fixed heuristics, no autotuning (reproducible builds, SPEC §7).

Every kernel keeps its tiles in registers, so the budget that matters is registers per thread
(255 at most; more spills to local memory). The tables below were chosen with
``fastrecloss kernels`` (``fastrecloss/backends/triton_aot.py``): every configuration they can produce compiles for
sm_80 and sm_90 with zero spills, for the heaviest option set (logQ, [R, N] mask, accidental hits,
positives from the table, every gradient), and the test suite asserts it.

* ``BLOCK_D`` = next power of two ≥ d: the whole feature dimension lives in registers (the
  shared layout needs ≥ 16 for ``tl.dot``), hence a maximum d (:func:`max_d`).
* shared layout (``tl.dot`` tiles, :data:`SHARED_TILES`): the score tile, the query-gradient
  accumulator [BLOCK_R, BLOCK_D] and the MMA operands are live together, so the tile shrinks and
  the warps grow with d. The rows kernel uses BLOCK_R as its MMA M dimension, the items kernel
  BLOCK_N; one tile serves both. fp32 inputs run 3×TF32 dots whose operands are split in two
  4-byte halves, so they get smaller tiles and stop at d = 128.
* per-row / indexed layouts (batched mat-vec, no reuse across rows): one [BLOCK_R, BLOCK_N,
  BLOCK_D] fp32 tile of :data:`GATHER_TILE` elements over 4 warps (16 elements per thread),
  BLOCK_N = min(next_pow2(N), tile/BLOCK_D, 64) negatives per step, and BLOCK_R rows when N is
  small.
* item-segment pass (deterministic indexed): BLOCK_E lanes × BLOCK_D, ≤ :data:`SEGMENT_TILE`.
* ``num_stages = 1`` everywhere (no cp.async software pipelining): the register and shared-memory
  figures above are for that; deeper pipelining is the first knob to try once timings can be
  measured on a GPU (none were, see docs/roofline.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_D = 256
MAX_D_SHARED_FP32 = 128
GATHER_TILE = 2048
SEGMENT_TILE = 2048


@dataclass(frozen=True)
class TileConfig:
    block_r: int
    block_n: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 1
    # ptxas may cap itself at 64–128 registers and spill a few bytes when left to choose (seen with
    # Triton 3.9's ptxas flags); an explicit .maxnreg 255 keeps every configuration spill-free.
    maxnreg: int = 255


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _wide(dtype: torch.dtype) -> bool:
    """fp32/fp64 inputs: 4-byte dot operands (3×TF32)."""
    return dtype in (torch.float32, torch.float64)


def max_d(layout: str, dtype: torch.dtype) -> int:
    return MAX_D_SHARED_FP32 if layout == "shared" and _wide(dtype) else MAX_D


def check_d(d: int, layout: str, dtype: torch.dtype) -> None:
    limit = max_d(layout, dtype)
    if d > limit:
        raise ValueError(f"backend='triton' supports d <= {limit} for {dtype} inputs in the {layout} layout (the "
                         f"feature dimension is held in registers), got d = {d}; use backend='torch'"
                         + (" or bf16 inputs" if limit < MAX_D else ""))


# (BLOCK_R, BLOCK_N, num_warps) of the shared layout by BLOCK_D: 2-byte inputs, 4-byte inputs.
SHARED_TILES = {
    False: {16: (64, 32, 4), 32: (64, 32, 4), 64: (64, 32, 4), 128: (64, 32, 8), 256: (32, 32, 8)},
    True: {16: (32, 16, 4), 32: (32, 16, 4), 64: (32, 32, 8), 128: (16, 16, 8)},
}


def shared_config(d: int, dtype: torch.dtype) -> TileConfig:
    check_d(d, "shared", dtype)
    block_d = max(16, next_pow2(d))
    block_r, block_n, warps = SHARED_TILES[_wide(dtype)][block_d]
    return TileConfig(block_r, block_n, block_d, warps)


def gathered_config(d: int, n: int, layout: str = "per_row", dtype: torch.dtype = torch.float32) -> TileConfig:
    check_d(d, layout, dtype)
    block_d = next_pow2(d)
    block_n = max(1, min(next_pow2(n), GATHER_TILE // block_d, 64))
    block_r = max(1, min(16, GATHER_TILE // (block_n * block_d)))
    return TileConfig(block_r, block_n, block_d, 4)


def segment_config(d: int) -> TileConfig:
    block_d = next_pow2(d)
    return TileConfig(max(1, min(64, SEGMENT_TILE // block_d)), 1, block_d, 4)


# The shapes whose configurations the AOT check compiles (``fastrecloss kernels``): every tile
# the heuristics above produce for powers of two d ≤ MAX_D, for 2-byte and 4-byte inputs, and for
# per-row/indexed both a small and a large N.
AOT_D = (16, 32, 64, 128, 256)
AOT_DTYPES = (torch.bfloat16, torch.float32)
AOT_N = (8, 1024)


# Full-ranking kernel (``kernels/ranking.py``): rank mode takes the shared layout's tile (≥ 32 items); top-k mode
# streams 32-item tiles and keeps
# K_PAD = the :data:`TOPK_WIDTHS` bucket of k int64 keys per row (two registers each) over 8 warps,
# in 16-row blocks (the ``tl.dot`` minimum) for the wide bucket and for fp32 inputs (3×TF32 operands),
# else 32 — the largest blocks that compiled without spills.
TOPK_WIDTHS = (64, 256)
MAX_TOPK = TOPK_WIDTHS[-1]


def topk_width(k: int) -> int:
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"backend='triton' supports 1 <= k <= {MAX_TOPK} for topk, got k = {k}; use backend='torch'")
    return next(w for w in TOPK_WIDTHS if k <= w)


def ranking_config(d: int, dtype: torch.dtype, k: int | None = None) -> TileConfig:
    """Tile of :func:`kernels.ranking.ranking_kernel` for the rank count (``k`` None) or a top-k."""
    cfg = shared_config(d, dtype)
    if k is None:  # 32-item tiles at least (a 16-wide fp32 tile at d = 128 spilled 8 bytes on sm_80)
        return TileConfig(cfg.block_r, max(cfg.block_n, 32), cfg.block_d, cfg.num_warps)
    block_r = 16 if _wide(dtype) or topk_width(k) > 64 else 32
    return TileConfig(block_r, 32, cfg.block_d, 8)
