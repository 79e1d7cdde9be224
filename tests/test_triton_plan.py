"""The launch plans of the triton backend: passes over the negatives, tiles (issue #12), no GPU.

Plans are built on the meta device (no memory, nothing launched), so the sizes are real ones.
"""

from __future__ import annotations

import pytest
import torch
from fastrecloss.kernels import config

from fastrecloss._problem import Problem
from fastrecloss._spec import Kind, LossSpec
from fastrecloss.backends import triton_plan


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _gathered(layout: str) -> Problem:
    R, N, d, I = 4096, 512, 128, 100_000  # noqa: E741
    if layout == "per_row":
        return Problem("per_row", _meta(R, d), _meta(R, N, d), _meta(R, d))
    return Problem("indexed", _meta(R, d), _meta(I, d), pos_idx=_meta(R, dtype=torch.int64),
                   neg_idx=_meta(R, N, dtype=torch.int64))


def _reads_of_negatives(plans: list[triton_plan.Plan]) -> int:
    """Kernel launches that stream a row's negatives (the per-row template's row passes)."""
    return sum(step.name == "rows_kernel" for pl in plans for step in pl.launches)


@pytest.mark.parametrize("kind", [Kind.CONTRASTIVE, Kind.BPR], ids=["contrastive", "bpr"])
@pytest.mark.parametrize("layout", ["per_row", "indexed"])
def test_gathered_forward_backward_reads_the_negatives_twice(layout: str, kind: Kind) -> None:
    """Forward: one state pass that saves O(R) row stats; backward: one gradient pass from them."""
    p = _gathered(layout)
    spec = LossSpec(kind, eps=1.0)
    fwd = triton_plan.plan(p, spec, None, (False, False, False), False, emulate_dot=False, save_state=True)
    assert fwd.state is not None and tuple(fwd.state.shape) == (4, p.R) and fwd.state.dtype == torch.float32
    (state_pass,) = fwd.launches
    assert state_pass.args["SAVE_STATS"] and not state_pass.args["FROM_STATS"]
    bwd = triton_plan.plan(p, spec, _meta(p.R, dtype=torch.float32), (True, True, True), False, emulate_dot=False,
                           state=fwd.state)
    (grad_pass,) = bwd.launches
    assert grad_pass.args["FROM_STATS"] and grad_pass.args["NEED_GN"] and grad_pass.args["LOSS"] is None
    assert grad_pass.args["ROW_SHIFT"] is not None and grad_pass.args["ROW_SHIFT"].shape == (p.R,)
    assert _reads_of_negatives([fwd, bwd]) == 2
    # ∂neg written once, by the gradient pass: in the input dtype for per-row (final), fp32 for atomics
    assert bwd.grad_neg.dtype == (torch.bfloat16 if layout == "per_row" else torch.float32)


def test_gathered_backward_without_saved_state_is_two_passes() -> None:
    """A direct forward_backward (fused scalar op) plans the state pass and the gradient pass itself."""
    p = _gathered("indexed")
    pl = triton_plan.plan(p, LossSpec(Kind.CONTRASTIVE), _meta(p.R, dtype=torch.float32), (True, False, True), False,
                          emulate_dot=False)
    assert [s.args["FROM_STATS"] for s in pl.launches] == [False, True]


def test_saved_state_is_refused_for_the_shared_layout() -> None:
    p = Problem("shared", _meta(64, 64), _meta(128, 64), _meta(64, 64))
    with pytest.raises(ValueError, match="per-row and indexed"):
        triton_plan.plan(p, LossSpec(Kind.CONTRASTIVE), None, (False, False, False), False, emulate_dot=False,
                         save_state=True)


@pytest.mark.parametrize("d", config.AOT_D)
def test_shared_16bit_tiles_have_mma_m_64_in_both_passes(d: int) -> None:
    """sm_90 warp-group MMA needs M ≥ 64: the rows pass's BLOCK_R and the items pass's BLOCK_N."""
    p = Problem("shared", _meta(8192, d), _meta(50_000, d), pos_idx=_meta(8192, dtype=torch.int64))
    pl = triton_plan.plan(p, LossSpec(Kind.CONTRASTIVE), _meta(8192, dtype=torch.float32), (True, False, True),
                          False, emulate_dot=False)
    rows, items = pl.launches
    assert rows.config.block_r >= 64 and items.config.block_n >= 64
    assert rows.config.num_stages >= 2 and items.config.num_stages >= 2
    assert rows.grid == (8192 // rows.config.block_r,) and items.grid == (-(-50_000 // items.config.block_n),)
    assert tuple(items.args["COEF_MAX"].shape) == (1,)
