"""Kernel side of issue #11: out-of-range indices are masked, and the shared item pass keeps fp16
table gradients from underflowing. The kernels run in the interpreter (conftest.py); the problems
are built directly (no validation), as CUDA tensors would reach the kernels."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastrecloss._problem import Problem
from fastrecloss._spec import Kind, LossSpec
from fastrecloss.backends import reference
from fastrecloss.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.interpreting(),
                                reason="the kernels run on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")

SPECS = [LossSpec(Kind.CONTRASTIVE, eps=1.0), LossSpec(Kind.BPR)]


def _assert_same(a, b) -> None:
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("spec", SPECS, ids=["contrastive", "bpr"])
def test_out_of_range_neg_idx_is_a_masked_negative(spec: LossSpec, deterministic: bool,
                                                   gen: torch.Generator) -> None:
    R, N, d, I = 9, 6, 8, 20  # noqa: E741
    table = torch.randn(I, d, generator=gen)
    idx = torch.randint(0, I, (R, N), generator=gen)
    bad = torch.rand(R, N, generator=gen) < 0.3
    bad[0, :] = True  # a row with every negative out of range
    wild = torch.where(torch.rand(R, N, generator=gen) < 0.5, torch.tensor(-100), torch.tensor(I + 7))
    common = dict(query=torch.randn(R, d, generator=gen), pos_idx=torch.randint(0, I, (R,), generator=gen),
                  log_q=-torch.rand(I, generator=gen))
    got_p = Problem("indexed", neg=table, neg_idx=torch.where(bad, wild, idx), **common)
    want_p = Problem("indexed", neg=table, neg_idx=torch.where(bad, 0, idx), neg_mask=bad, **common)
    row_scale = torch.rand(R, generator=gen)
    for p_args in ((None, (False, False, False)), (row_scale, (True, False, True))):
        got = triton_backend.forward_backward(got_p, spec, *p_args, deterministic)
        want = triton_backend.forward_backward(want_p, spec, *p_args, deterministic)
        _assert_same(got, want)
    # the same through the saved-state backward of the autograd path
    rows, state = triton_backend.forward_state(got_p, spec, deterministic)
    grads = triton_backend.backward_from_state(got_p, spec, state, row_scale, (True, False, True), deterministic)
    _assert_same((rows, *grads), triton_backend.forward_backward(want_p, spec, row_scale, (True, False, True),
                                                                  deterministic))


@pytest.mark.parametrize("layout", ["shared", "indexed"])
def test_out_of_range_pos_idx_is_never_dereferenced(layout: str, gen: torch.Generator) -> None:
    """A row whose pos_idx is ignore_index (weight 0 upstream) adds nothing anywhere."""
    R, N, d, I = 7, 5, 8, 16  # noqa: E741
    table = torch.randn(I, d, generator=gen)
    pos_idx = torch.randint(0, I, (R,), generator=gen)
    extra = {"neg_idx": torch.randint(0, I, (R, N), generator=gen)} if layout == "indexed" else {}
    base = Problem(layout, torch.randn(R, d, generator=gen), table, pos_idx=pos_idx, **extra)
    ignored = dataclasses.replace(base, pos_idx=torch.where(torch.arange(R) == 3, -100, pos_idx))
    zeroed = dataclasses.replace(base, pos_idx=torch.where(torch.arange(R) == 3, 0, pos_idx))
    row_scale = torch.where(torch.arange(R) == 3, 0.0, torch.rand(R, generator=gen))
    spec = LossSpec(Kind.CONTRASTIVE)
    got = triton_backend.forward_backward(ignored, spec, row_scale, (True, False, True))
    want = triton_backend.forward_backward(zeroed, spec, row_scale, (True, False, True))
    _assert_same(got[1:], want[1:])
    _assert_same((got[0][torch.arange(R) != 3],), (want[0][torch.arange(R) != 3],))


def test_fp16_table_gradient_survives_catalogue_scale_coefficients(gen: torch.Generator) -> None:
    """At catalogue scale the row coefficient ≈ 1/(Σexp·R·τ) is below fp16's smallest subnormal
    (6e-8); emulated here with a row scale of 1e-9 on a small problem. The item pass normalises G by
    the largest coefficient before the 16-bit MMA, so ∂table stays accurate instead of 0."""
    R, N, d = 40, 70, 16
    q = (torch.randn(R, d, generator=gen) * 0.5).half()
    table = (torch.randn(N, d, generator=gen) * 0.5).half()
    p = Problem("shared", q, table, pos_idx=torch.randint(0, N, (R,), generator=gen))
    row_scale = torch.full((R,), 1e-9)
    spec = LossSpec(Kind.CONTRASTIVE)
    *_, g_table = triton_backend.forward_backward(p, spec, row_scale, (False, False, True))

    q64, t64 = q.double().requires_grad_(), table.double().requires_grad_()
    p64 = dataclasses.replace(p, query=q64, neg=t64)
    (reference.row_losses(p64, spec) * row_scale.double()).sum().backward()
    want = t64.grad
    assert want.abs().max() < 6e-8 * 10  # the raw G entries are far below fp16's normal range
    err = (g_table.double() - want).abs().max() / want.abs().max()
    assert err < 2e-2, err
