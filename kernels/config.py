"""Launch configurations: fixed heuristics, no autotuning (reproducible builds, SPEC §7).

Every kernel keeps its tiles in registers, so the budget that matters is registers per thread
(255 at most; more spills to local memory). The tables below were chosen with
``fastrecloss kernels`` (``fastrecloss/backends/triton_aot.py``): every configuration they can produce compiles for
sm_80 and sm_90 with zero spills, for the heaviest option set (logQ, [R, N] mask, accidental hits,
positives from the table, every gradient), and the test suite asserts it.

* shared layout: any d. Up to :data:`MAX_D` (16-bit) / :data:`MAX_D_SHARED_FP32` (fp32) inputs,
  ``BLOCK_D`` = next power of two ≥ d: the whole feature dimension lives in registers (``tl.dot``
  needs ≥ 16). Beyond (:func:`shared_chunks`), a K loop over d (``D_LOOP``): the score MMA runs over
  K chunks of ``block_dk`` columns (masked only when they do not divide d) and each program owns one
  output chunk of the gradient accumulator (a grid axis: :data:`SHARED_DO` columns of ∂q in the rows
  pass, :data:`SHARED_DO_ITEMS` of ∂V in the items pass), recomputing the scores over all of d
  (``kernels/shared.py``). The full-ranking kernel (scores only) loops over d
  in K chunks beyond the same bound.
* per-row / indexed layouts: any d. Up to d = 64, and for powers of two up to 256, ``BLOCK_D`` =
  next_pow2(d) holds d in registers; otherwise (:func:`gathered_block_d`) the kernels run a K loop
  over d in ``BLOCK_D`` chunks (``D_LOOP``; only the last chunk is masked) and keep the ∂q / ∂table
  accumulator in the program-owned fp32 output rows (see ``kernels/per_row.py``).
* shared layout (``tl.dot`` tiles, :data:`SHARED_TILES`): one tile per pass. The rows kernel uses
  BLOCK_R as its MMA M dimension, the items kernel BLOCK_N; for 2-byte inputs both are 64, the M of
  one sm_90 warp-group MMA (HGMMA m64nNk16), so both passes run warp-group MMA, with
  ``num_stages = 2`` (the next item / row tile is prefetched while this one is computed). The score
  tile, the gradient accumulator [64, BLOCK_D] and the MMA operands are live together, so the
  inner tile (BLOCK_N of the rows pass, BLOCK_R of the items pass) shrinks and the warps grow with
  d. fp32 inputs run 3×TF32 dots whose operands are split in two 4-byte halves, so they keep
  smaller tiles, one stage, and hold d in registers up to d = 128. With the K loop over d the tiles
  are those of the output chunk's width (rows 128, 16-bit items 256): a K-loop program keeps one K
  chunk of Q and V instead of the resident block, so it needs no more registers than that tile.
* per-row / indexed layouts (batched mat-vec, no reuse across rows): one [BLOCK_R, BLOCK_N,
  BLOCK_D] fp32 tile of :data:`GATHER_TILE` elements over 4 warps (16 elements per thread),
  BLOCK_N = min(next_pow2(N), tile/BLOCK_D, 64) negatives per step, and BLOCK_R rows when N is
  small.
* item-segment pass (deterministic indexed): BLOCK_E lanes × BLOCK_D, ≤ :data:`SEGMENT_TILE`, over
  chunks of :data:`SEGMENT_CHUNK` sorted references (``kernels/indexed.py``); its merge pass the same.
* ``num_stages = 1`` for fp32 shared tiles and the gathered layouts (their loads are gathers that
  the pipeliner does not stage); no timing was measured on a GPU (see docs/roofline.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_D = 256
MAX_D_SHARED_FP32 = 128
GATHER_TILE = 2048
SEGMENT_TILE = 2048
SEGMENT_CHUNK = 128  # sorted references per chunk of the deterministic item-segment pass
GATHER_DK = (128, 64, 32)  # K-loop chunks of the gathered layouts, largest first


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
    block_dk: int = 0  # K chunk of a K loop over d (shared layout, D_LOOP); 0: no K loop


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _wide(dtype: torch.dtype) -> bool:
    """fp32/fp64 inputs: 4-byte dot operands (3×TF32)."""
    return dtype in (torch.float32, torch.float64)


def register_d(dtype: torch.dtype) -> int:
    """Largest d whose feature dimension the shared-layout kernels hold in one register tile."""
    return MAX_D_SHARED_FP32 if _wide(dtype) else MAX_D


# Shared layout by BLOCK_D: ((BLOCK_R, BLOCK_N, num_warps) of the rows pass, (BLOCK_N, BLOCK_R,
# num_warps) of the items pass — M dimension first), for 2-byte and 4-byte inputs.
SHARED_TILES = {
    False: {16: ((64, 64, 4), (64, 64, 4)), 32: ((64, 64, 4), (64, 64, 4)), 64: ((64, 64, 4), (64, 64, 4)),
            128: ((64, 64, 8), (64, 64, 8)), 256: ((64, 32, 8), (64, 32, 8))},
    True: {16: ((32, 16, 4), (16, 32, 4)), 32: ((32, 16, 4), (16, 32, 4)), 64: ((32, 32, 8), (32, 32, 8)),
           128: ((16, 16, 8), (16, 16, 8))},
}


# Label smoothing with a per-(row, item) mask (SMOOTH and [R, N] mask or accidental hits) keeps a
# second [BLOCK_R, BLOCK_D] accumulator (Σ_j v_j over each row's kept candidates) in the rows pass:
# 2-byte inputs get 8 warps there, and 32 rows (mma.sync, no HGMMA) from d = 128 on. Without such a
# mask the kept set is the same for every row and the sum is a [BLOCK_D] column sum (default tiles
# up to d = 128; the 32-row tile at d = 256, where the column sum's registers would spill).
SMOOTH_ROWS = {16: (64, 64, 8), 32: (64, 64, 8), 64: (64, 64, 8), 128: (32, 32, 8), 256: (32, 16, 8)}


# K loop over d of the shared layout (d > register_d): the output chunk of a program's gradient
# accumulator — ∂q in the rows pass (SHARED_DO), ∂V in the items pass (SHARED_DO_ITEMS) — with the
# tiles of SHARED_TILES at that width, and the K chunks of the score MMA, largest first (the first
# whose last chunk pads d by at most d/8). 16-bit rows pass: 128 columns (64 × 64 tiles) beat 256
# (its 32 × 32 tiles with per-pair masks) by 3.2× in static cycles per score although the score MMA
# repeats 3 times instead of 2 at d = 320; the items pass keeps 256 (64 × 32), 9–32 % below 128
# (scripts/sass_shared_dloop.py, docs/roofline.md).
SHARED_DO = {False: 128, True: 128}
SHARED_DO_ITEMS = {False: 256, True: 128}
SHARED_DK = (64, 32, 16)


def fit_chunk(d: int, chunks: tuple[int, ...]) -> int:
    """The largest of ``chunks`` whose last chunk pads d by at most d/8, else the smallest."""
    return next((c for c in chunks if -(-d // c) * c - d <= d // 8), chunks[-1])


def shared_chunks(d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_DK, BLOCK_D) of the shared rows pass: (0, next_pow2(d)) for d ≤ :func:`register_d` (d in
    registers, no K loop); else the K chunk of the scores and the output chunk (:data:`SHARED_DO`):
    d = 320, bf16 → K chunks of 64 (5), output chunks of 128 (3)."""
    if d <= register_d(dtype):
        return 0, max(16, next_pow2(d))
    return fit_chunk(d, SHARED_DK), SHARED_DO[_wide(dtype)]


def shared_configs(d: int, dtype: torch.dtype, smooth: bool = False, pairs: bool = False,
                   arch: int = 90) -> tuple[TileConfig, TileConfig]:
    """(rows pass, items pass) tiles; both as TileConfig(block_r, block_n, ...). ``smooth``: label
    smoothing is on; ``pairs``: a per-(row, item) mask (an [R, N] mask or accidental hits) is;
    ``arch``: the compute capability ×10 (sm_80's mma.sync keeps more operands in registers). With a
    K loop over d (``block_dk`` > 0) the tiles are those of the output chunk's width."""
    block_dk, block_d = shared_chunks(d, dtype)
    block_d_items = SHARED_DO_ITEMS[_wide(dtype)] if block_dk else block_d
    (br, bn, w_rows), _ = SHARED_TILES[_wide(dtype)][block_d]
    _, (bn_i, br_i, w_items) = SHARED_TILES[_wide(dtype)][block_d_items]
    if smooth and (pairs or block_d == 256) and not _wide(dtype):
        br, bn, w_rows = SMOOTH_ROWS[block_d]
    elif pairs and not _wide(dtype) and block_d == 256:
        br = 32  # the keep tile and the ids beside a [64, 256] accumulator spill (in-batch, sm_90): mma.sync
    elif pairs and not _wide(dtype) and arch < 90:
        w_rows = max(w_rows, 8)  # the keep tile and the int32 id codes: 4 warps can spill with mma.sync
    stages = 1 if _wide(dtype) else 2
    return (TileConfig(br, bn, block_d, w_rows, stages, block_dk=block_dk),
            TileConfig(br_i, bn_i, block_d_items, w_items, stages, block_dk=block_dk))


# Small-R grids (flash-decoding, issue #12 item 3): when the rows pass has at most half as many row
# blocks as the GPU has SMs, the items are split over S programs per row block, each streaming a contiguous range
# of at least SPLIT_MIN_TILES item tiles (its partial ∂q accumulator, BLOCK_R·d fp32 written and read
# back once, then costs ≤ half the bf16 item range it streamed), and a merge kernel of MERGE_TILE
# fp32 elements per [rows, d] block (4 warps, 16 per thread and accumulator) folds the partials.
SM_COUNT = 132  # H100 SXM5: the count assumed by AOT compilation and the interpreter
SPLIT_MIN_TILES = 8
MERGE_TILE = 2048
# Lazy ∂q rescale (issue #12 item 4): the contrastive rows pass moves a row's reference max only
# when a tile's max exceeds it by more than this many log2 units, and skips the accumulator's
# rescale on the tiles where none moved. The block-wide test that decides it costs ~24
# instructions per thread and tile, so it is used only where the skipped rescale is at least
# LAZY_MIN_FMULS multiplies per thread (BLOCK_R·BLOCK_D / threads: 32 at d = 64, 128, 256) and
# for 16-bit inputs: with fp32 inputs (3×TF32) ptxas emitted no skippable block and the loop grew
# (741 → 772 instructions, sm_90; docs/roofline.md).
LAZY_RESCALE_LOG2 = 8.0
LAZY_MIN_FMULS = 32


def lazy_rescale(kind: int, dtype: torch.dtype, rows: TileConfig) -> float:
    """The LAZY_TH of the shared rows pass with tile ``rows``: LAZY_RESCALE_LOG2 or 0.0 (rescale on
    every tile)."""
    fmuls = rows.block_r * rows.block_d // (32 * rows.num_warps)
    return LAZY_RESCALE_LOG2 if kind == 0 and not _wide(dtype) and fmuls >= LAZY_MIN_FMULS else 0.0


def split_count(row_blocks: int, n_tiles: int, sm_count: int = SM_COUNT, splits: int | None = None) -> tuple[int, int]:
    """(S, item tiles per split) of the shared rows pass: S = min(⌊sm_count / row_blocks⌋,
    cdiv(n_tiles, SPLIT_MIN_TILES)), at least 1 — at most one program per SM, so the grid is one
    balanced wave (a ceiling would put a second program on a few SMs, which then finish last); 1
    when the row blocks fill more than half the SMs. ``splits`` forces S (a test hook). S is then
    reduced so that no split is empty."""
    if splits is None:
        splits = max(1, min(sm_count // max(row_blocks, 1), -(-n_tiles // SPLIT_MIN_TILES)))
    per_split = -(-n_tiles // max(1, min(splits, n_tiles))) if n_tiles else 0
    return (-(-n_tiles // per_split) if per_split else 1), per_split


def merge_config(d: int, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """The merge kernel of a split rows pass: [BLOCK_R, BLOCK_D] blocks of MERGE_TILE elements; with a K
    loop over d, blocks of the rows pass's output chunk (one merge program per row block and chunk)."""
    block_dk, block_d = shared_chunks(d, dtype)
    return TileConfig(max(1, min(64, MERGE_TILE // block_d)), 1, block_d, 4, block_dk=block_dk)


def gathered_block_d(d: int) -> int:
    """BLOCK_D of the per-row / indexed kernels; < d means a K loop over d (``D_LOOP``).

    d ≤ 64, or a power of two ≤ MAX_D: one register tile (next_pow2(d)). Otherwise the largest
    chunk of :data:`GATHER_DK` whose last chunk pads d by at most d/8 (d = 96 → 32, 192 → 64,
    320 → 64, 384 / 1000 / 4096 → 128), else 16: no power-of-two waste beyond the last chunk."""
    block = next_pow2(d)
    if d <= 64 or (block == d and d <= MAX_D):
        return block
    return fit_chunk(d, GATHER_DK + (16,))


def gathered_config(d: int, n: int) -> TileConfig:
    block_d = gathered_block_d(d)
    block_n = max(1, min(next_pow2(n), GATHER_TILE // block_d, 64))
    block_r = max(1, min(16, GATHER_TILE // (block_n * block_d)))
    return TileConfig(block_r, block_n, block_d, 4)


def segment_config(d: int) -> TileConfig:
    """Lanes (``block_r``) × BLOCK_D of the item-segment pass and of its merge pass."""
    block_d = gathered_block_d(d)
    return TileConfig(max(1, min(64, SEGMENT_TILE // block_d)), 1, block_d, 4)


# The shapes whose configurations the AOT check compiles (``fastrecloss kernels``): every tile
# the heuristics above produce for powers of two d ≤ MAX_D, for 2-byte and 4-byte inputs, and for
# per-row/indexed both a small and a large N.
AOT_D = (16, 32, 64, 128, 256)
AOT_D_GATHERED = (96, 320, 1024)  # per-row / indexed only: the K loop over d (chunks of 32, 64, 128)
# shared: the K loop over d (K chunks of 64; output chunks of 256 bf16, 128 fp32), 500 with a masked last K chunk
AOT_D_SHARED_LOOP = (320, 500)
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


# (BLOCK_R, BLOCK_N, num_warps) of the rank count by BLOCK_D, for 2-byte and 4-byte inputs: the tiles its
# zero-spill AOT check was first run with (one pass, no gradient accumulators, no pipelining).
RANK_TILES = {
    False: {16: (64, 32, 4), 32: (64, 32, 4), 64: (64, 32, 4), 128: (64, 32, 8), 256: (32, 32, 8)},
    True: {16: (32, 32, 4), 32: (32, 32, 4), 64: (32, 32, 8), 128: (16, 32, 8)},
}


def ranking_config(d: int, dtype: torch.dtype, k: int | None = None) -> TileConfig:
    """Tile of :func:`kernels.ranking.ranking_kernel` for the rank count (``k`` None) or a top-k. Beyond
    :func:`register_d`, a K loop over d in chunks of ``block_dk`` (= ``block_d``) with the tile of that
    width: only a chunk of the query block is live, as in the register tile of d = ``block_dk``."""
    block_dk = fit_chunk(d, SHARED_DK) if d > register_d(dtype) else 0
    block_d = block_dk or max(16, next_pow2(d))
    block_r, block_n, warps = RANK_TILES[_wide(dtype)][block_d]
    if k is None and not block_dk:  # 32-item tiles at least (a 16-wide fp32 tile at d = 128 spilled 8 B on sm_80)
        return TileConfig(block_r, block_n, block_d, warps, block_dk=block_dk)
    # top-k, and the rank count with the K loop (its RANK_TILES tile spilled 40–56 B at d = 500, whose
    # unaligned rows make every chunk load scalar): 8 warps, 32 rows (16 for wide inputs and buckets)
    block_r = 16 if _wide(dtype) or (k is not None and topk_width(k) > 64) else 32
    return TileConfig(block_r, 32, block_d, 8, block_dk=block_dk)
