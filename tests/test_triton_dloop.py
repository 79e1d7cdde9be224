"""Issue #12: the K loop over d of the per-row and indexed layouts (any d, no power-of-two padding
beyond the last chunk). The kernels run in the interpreter (conftest.py) on small R, N."""

from __future__ import annotations

import pytest
import torch
from fastrecloss.kernels import config
from helpers import CASES, check_case, make_inputs

from fastrecloss.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.interpreting(),
                                reason="the kernels run on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")

F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize(("d", "chunk"), [(96, 32), (192, 64), (320, 64), (384, 128), (1000, 128), (4096, 128),
                                          (100, 16), (64, 64), (256, 256), (33, 64)])
def test_gathered_block_d(d: int, chunk: int) -> None:
    """Register tile up to d = 64 and for powers of two up to 256; else a chunk that pads ≤ d/8."""
    assert config.gathered_block_d(d) == chunk
    cfg = config.gathered_config(d, 1000)
    assert cfg.block_d == chunk and cfg.block_r * cfg.block_n * cfg.block_d <= config.GATHER_TILE
    if chunk < d:
        assert -(-d // chunk) * chunk - d <= max(d // 8, 15)


DLOOP = [(case, layout, d, dtype) for d in (96, 320) for layout in ("per_row", "indexed")
         for case, dtype in ((CASES["infonce"], F32), (CASES["bpr"], BF16))]


@pytest.mark.parametrize(("case", "layout", "d", "dtype"), DLOOP,
                         ids=[f"{c.id}-{lay}-d{d}-{str(t)[6:]}" for c, lay, d, t in DLOOP])
def test_k_loop_matches_oracle(case, layout: str, d: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Loss and every gradient at d = 96 (3 chunks of 32) and 320 (5 of 64), every option."""
    opts = dict(log_q=True, hits=True, mask="row", weight=True, pos_idx=layout == "indexed")
    check_case(case, "triton", make_inputs(layout, 5, 6, d, gen=gen, dup=True, **opts), dtype)


@pytest.mark.parametrize("layout", ["per_row", "indexed"])
def test_k_loop_loss_and_query_gradient_only(layout: str, gen: torch.Generator) -> None:
    """∂q without ∂neg (a single pass with d in registers) takes the two-pass route with the K loop;
    label smoothing and a random upstream gradient with reduction='none'."""
    inputs = make_inputs(layout, 4, 5, 96, gen=gen, log_q=True, pos_idx=layout == "indexed")
    up = torch.rand(4, generator=gen)
    check_case(CASES["infonce"], "triton", inputs, F32, grad_of=("query",), reduction="none", upstream=up)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("layout", ["per_row", "indexed"])
def test_k_loop_masked_last_chunk(layout: str, deterministic: bool, gen: torch.Generator) -> None:
    """d = 200: 7 chunks of 32, the last one 8 wide (masked); the deterministic item-segment pass
    loops over d too. Colliding references (I = 4)."""
    assert config.gathered_block_d(200) == 32
    inputs = make_inputs(layout, 6, 5, 200, gen=gen, dup=True, log_q=True, **(
        dict(I=4, pos_idx=True) if layout == "indexed" else {}))
    check_case(CASES["mine_plus"], "triton", inputs, F32, deterministic=deterministic)


def test_k_loop_plans_two_passes_for_the_query_gradient() -> None:
    """With d in registers, ∂q alone is one pass; with the K loop the state pass computes no gradient,
    so the gradient pass follows (planned on the meta device, nothing runs)."""
    from fastrecloss._problem import Problem
    from fastrecloss._spec import Kind, LossSpec
    from fastrecloss.backends import triton_plan

    def meta(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    for d, passes in ((128, [False]), (96, [False, True]), (4096, [False, True])):
        p = Problem("per_row", meta(64, d), meta(64, 100, d), meta(64, d))
        plan = triton_plan.plan(p, LossSpec(Kind.CONTRASTIVE), meta(64, dtype=F32), (True, True, False), False,
                                emulate_dot=False)
        assert [s.args["FROM_STATS"] for s in plan.launches] == passes, d
        assert all(s.args["D_LOOP"] == (d != 128) for s in plan.launches)
        assert plan.launches[-1].args["BLOCK_D"] == config.gathered_block_d(d)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_k_loop_label_smoothing_and_z_loss(deterministic: bool, gen: torch.Generator) -> None:
    """The uniform label-smoothing term and the z-loss through the K loop (indexed, pos_idx, [R, N] mask)."""
    import dataclasses

    from fastrecloss._problem import Problem
    from fastrecloss._spec import Kind, LossSpec
    from fastrecloss.backends import reference

    R, N, I, d = 6, 7, 12, 96  # noqa: E741
    p = Problem("indexed", torch.randn(R, d, generator=gen) * 0.3, torch.randn(I, d, generator=gen) * 0.3,
                neg_idx=torch.randint(0, I, (R, N), generator=gen), pos_idx=torch.randint(0, I, (R,), generator=gen),
                neg_mask=torch.rand(R, N, generator=gen) < 0.2)
    spec = LossSpec(Kind.CONTRASTIVE, eps=1.0, label_smoothing=0.1, z_loss=1e-3)
    row_scale = torch.rand(R, generator=gen)
    loss, gq, _, gn = triton_backend.forward_backward(p, spec, row_scale, (True, False, True), deterministic)
    q, table = p.query.double().requires_grad_(), p.neg.double().requires_grad_()
    rows = reference.row_losses(dataclasses.replace(p, query=q, neg=table), spec)
    (rows * row_scale.double()).sum().backward()
    for got, want in ((loss, rows.detach()), (gq, q.grad), (gn, table.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("layout", "d", "chunk"), [("indexed", 1024, 128), ("per_row", 513, 64)])
def test_large_d_beyond_the_old_limit(layout: str, d: int, chunk: int, gen: torch.Generator) -> None:
    """d > 256 was refused before the K loop: 8 chunks of 128, and 513 = 9 chunks of 64, the last 1 wide."""
    assert config.gathered_block_d(d) == chunk
    inputs = make_inputs(layout, 3, 4, d, gen=gen, log_q=True, **({"pos_idx": True} if layout == "indexed" else {}))
    check_case(CASES["infonce"], "triton", inputs, F32)
