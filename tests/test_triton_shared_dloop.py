"""Issue #12 item 2: the shared layout's K loop over d (any d; d > 256 for 16-bit inputs, d > 128 for
fp32). Oracle tests run the kernels in the interpreter (conftest.py) on small R and N; plan tests run on
the meta device at real sizes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from fastrecloss.kernels import config
from helpers import CASES, check_case, make_inputs, run_case

from fastrecloss._problem import Problem
from fastrecloss._spec import Kind, LossSpec
from fastrecloss.backends import triton as triton_backend
from fastrecloss.backends import triton_plan

F32, BF16 = torch.float32, torch.bfloat16
interpreted = pytest.mark.skipif(not triton_backend.interpreting(),
                                 reason="the kernels run on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")


@pytest.mark.parametrize(("d", "dtype", "chunks"), [
    (64, BF16, (0, 64)), (96, BF16, (0, 128)), (256, BF16, (0, 256)), (128, F32, (0, 128)),
    (320, BF16, (64, 128)), (513, BF16, (64, 128)), (257, BF16, (32, 128)), (192, F32, (64, 128)),
    (129, F32, (16, 128)), (4096, BF16, (64, 128))])
def test_shared_chunks(d: int, dtype: torch.dtype, chunks: tuple[int, int]) -> None:
    """d in registers up to 256 (16-bit) / 128 (fp32), today's tiles; beyond, K chunks padding d by ≤ d/8
    (16 else) and output chunks of SHARED_DO (rows) / SHARED_DO_ITEMS (items) columns, with the
    register path's tiles of those widths."""
    assert config.shared_chunks(d, dtype) == chunks
    rows, items = config.shared_configs(d, dtype)
    items_d = config.SHARED_DO_ITEMS[dtype == F32] if chunks[0] else chunks[1]
    assert rows.block_dk == items.block_dk == chunks[0] and (rows.block_d, items.block_d) == (chunks[1], items_d)
    if chunks[0]:
        assert -(-d // chunks[0]) * chunks[0] - d <= max(d // 8, 15)
        assert rows == dataclasses.replace(config.shared_configs(chunks[1], dtype)[0], block_dk=chunks[0])
        assert items == dataclasses.replace(config.shared_configs(items_d, dtype)[1], block_dk=chunks[0])


def _meta(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _shared_plan(R: int, N: int, d: int, dtype: torch.dtype = BF16, **kwargs) -> triton_plan.Plan:
    p = Problem("shared", _meta(R, d, dtype=dtype), _meta(N, d, dtype=dtype), pos_idx=_meta(R, dtype=torch.int64),
                log_q=_meta(N, dtype=F32), neg_mask=_meta(N, dtype=torch.bool))
    return triton_plan.plan(p, LossSpec(Kind.CONTRASTIVE, eps=1.0, label_smoothing=0.1), _meta(R, dtype=F32),
                            (True, False, True), False, emulate_dot=False, **kwargs)


@pytest.mark.parametrize(("R", "d", "dtype"), [(65536, 320, BF16), (256, 320, BF16), (64, 513, F32)])
def test_k_loop_grids_and_workspace_have_no_rxn_term(R: int, d: int, dtype: torch.dtype) -> None:
    """Grids: (row blocks, S, output chunks) and (item blocks, output chunks); every buffer the plan
    allocates is the same for N = 2^16 and 2^20 except ∂neg [N, d]: no R×N term, and the split
    workspace is O(S·R·d) with S·(row blocks)·(output chunks) ≤ SMs (small R: split)."""
    plans = {N: _shared_plan(R, N, d, dtype) for N in (1 << 16, 1 << 20)}
    block_dk, block_d = config.shared_chunks(d, dtype)
    chunks = -(-d // block_d)
    item_chunks = -(-d // (config.SHARED_DO_ITEMS[dtype == F32]))
    for N, pl in plans.items():
        rows = [s for s in pl.launches if s.name == "shared_rows_kernel"]
        (items,) = [s for s in pl.launches if s.name == "shared_items_kernel"]
        assert all(s.args["D_LOOP"] and s.args["BLOCK_DK"] == block_dk for s in pl.launches)
        for s in rows:
            assert s.grid[::2] == (-(-R // s.config.block_r), chunks) and (s.grid[1] > 1) == s.args["SPLIT"]
        assert items.grid == (-(-N // items.config.block_n), item_chunks)
        merges = [s for s in pl.launches if s.name == "shared_rows_kernel:merge"]
        assert bool(merges) == (R < 65536)  # S·(row blocks)·(output chunks) ≤ SMs
        for s in merges:
            assert s.grid == (-(-R // s.config.block_r), 1, -(-d // s.config.block_d)) and s.args["D_LOOP"]
            assert s.config.block_d == block_d and s.config.block_r * s.config.block_d <= config.MERGE_TILE
            assert s.args["n_splits"] == rows[0].grid[1] > 1
            assert math.prod(rows[0].grid) <= config.SM_COUNT

    def scratch(pl: triton_plan.Plan) -> list[tuple[str, tuple[int, ...]]]:
        tensors = {(k, tuple(v.shape)) for s in pl.launches for k, v in s.args.items()
                   if isinstance(v, torch.Tensor) and k not in ("Q", "NEG", "POS_IDX", "LOG_Q", "MASK", "ROW_SCALE")}
        return sorted(t for t in tensors if t[0] != "GRAD_NEG")

    small, large = (scratch(plans[N]) for N in sorted(plans))
    assert small == large and small  # nothing but ∂neg grows with N
    assert all(shape[-1] in (R, d) or shape == (1,) for _, shape in small), small
    assert tuple(plans[1 << 20].grad_neg.shape) == (1 << 20, d)


def test_register_path_is_unchanged_up_to_256() -> None:
    """d ≤ 256 (16-bit) keeps one register tile and a 1-D grid: today's kernels, tiles and launches."""
    for d in (16, 64, 96, 128, 192, 256):
        pl = _shared_plan(65536, 1 << 20, d)
        assert all(not s.args["D_LOOP"] and s.args["BLOCK_D"] == max(16, config.next_pow2(d)) for s in pl.launches)
        assert all(len(s.grid) == 1 for s in pl.launches), [s.grid for s in pl.launches]
        assert pl.launches[0].config == config.shared_configs(d, BF16, smooth=True)[0]


DLOOP = [  # (case, d, dtype, options): the contrastive family and pointwise losses, [N] mask / logQ / [R, N]
    (CASES["infonce"], 320, BF16, dict(log_q=True, pos_idx=True, hits=True, mask="row", weight=True)),
    (CASES["mine_plus"], 320, F32, dict(log_q=True, pos_log_q=True, mask="col", dup=True)),
    (CASES["infonce_plus"], 192, F32, dict(pos_idx=True, hits=True, log_q=True)),
    (CASES["bce"], 513, F32, dict(log_q=True, mask="col", weight=True, N=20)),
    (CASES["bpr"], 513, BF16, dict(pos_idx=True, mask="row")),
]


@interpreted
@pytest.mark.parametrize(("case", "d", "dtype", "opts"), DLOOP,
                         ids=[f"{c.id}-d{d}-{str(t)[6:]}" for c, d, t, _ in DLOOP])
def test_k_loop_matches_oracle(case, d: int, dtype: torch.dtype, opts: dict, gen: torch.Generator) -> None:
    """Loss and every gradient (∂q, ∂pos, ∂neg) through the K loop; the output chunks split d (d = 320:
    3 of 128 in the rows pass, 2 of 256 in the bf16 items pass; 192 fp32: 2 × 128; 513: 5 × 128 rows,
    3 × 256 bf16 items)."""
    assert config.shared_chunks(d, dtype)[0] > 0
    opts = dict(opts)
    check_case(case, "triton", make_inputs("shared", 5, opts.pop("N", 40), d, gen=gen, **opts), dtype)


@interpreted
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_k_loop_loss_without_gradients(dtype: torch.dtype, gen: torch.Generator) -> None:
    check_case(CASES["dcl"], "triton", make_inputs("shared", 5, 40, 320, gen=gen, log_q=True), dtype, grad_of=())


@interpreted
def test_k_loop_label_smoothing_split_and_z_loss(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full-catalogue CE with label smoothing and z-loss, a [N] mask, the rows pass split in 2 (its
    partial ∂q and Σv per output chunk, merged per chunk)."""
    plans: list[triton_plan.Plan] = []
    original = triton_plan.plan
    monkeypatch.setattr(triton_plan, "plan", lambda *a, **k: plans.append(original(*a, **k, splits=2)) or plans[-1])
    inputs = make_inputs("shared", 5, 40, 300, gen=gen, pos_idx=True, log_q=True, mask="col")
    check_case(CASES["softmax_ce"], "triton", inputs, F32, label_smoothing=0.15, z_loss=1e-2)
    splits = [s for pl in plans for s in pl.launches if s.args.get("SPLIT")]
    assert splits and all(s.grid[1:] == (2, 3) for s in splits)  # fp32: 3 output chunks of 128
    assert any(s.name == "shared_rows_kernel:merge" and s.grid[2] == 3 for pl in plans for s in pl.launches)


@interpreted
def test_k_loop_deterministic_is_bit_identical(gen: torch.Generator) -> None:
    inputs = make_inputs("shared", 5, 40, 320, gen=gen, log_q=True, pos_idx=True, hits=True)
    first, second = (run_case("infonce", "triton", inputs, BF16, deterministic=True) for _ in range(2))
    assert torch.equal(first[0], second[0])
    assert first[1].keys() == second[1].keys() == {"query", "neg"}
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])
