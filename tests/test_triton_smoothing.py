"""Label smoothing and z-loss in the kernels (issue #11), against F.cross_entropy and the oracle."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastrecloss import functional as F
from fastrecloss._problem import Problem
from fastrecloss._spec import Kind, LossSpec
from fastrecloss.backends import reference
from fastrecloss.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.interpreting(),
                                reason="the kernels run on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")


def test_softmax_ce_label_smoothing_and_z_loss_match_cross_entropy(gen: torch.Generator) -> None:
    R, I, d, alpha, z = 37, 150, 24, 0.1, 1e-2  # noqa: E741
    q = torch.randn(R, d, generator=gen, dtype=torch.float64)
    table = torch.randn(I, d, generator=gen, dtype=torch.float64)
    target = torch.randint(0, I, (R,), generator=gen)
    q64, t64 = q.clone().requires_grad_(), table.clone().requires_grad_()
    logits = q64 @ t64.T / 0.5
    want = torch.nn.functional.cross_entropy(logits, target, label_smoothing=alpha) \
        + z * (torch.logsumexp(logits, 1) ** 2).mean()
    want_grads = torch.autograd.grad(want, [q64, t64])
    q32, t32 = q.float().requires_grad_(), table.float().requires_grad_()
    got = F.softmax_ce(q32, t32, target, temperature=0.5, label_smoothing=alpha, z_loss=z, backend="triton")
    got_grads = torch.autograd.grad(got, [q32, t32])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["shared", "per_row", "indexed"])
def test_label_smoothing_every_layout_with_masks(layout: str, gen: torch.Generator) -> None:
    """infonce (positive in the LSE) with α = 0.2, z = 0.05 and a [R, N] mask, from the saved-state
    backward (gathered) or the fused pass (shared), against the float64 oracle."""
    R, N, d, I = 9, 7, 8, 25  # noqa: E741
    q = torch.randn(R, d, generator=gen, dtype=torch.float64)
    mask = torch.rand(R, N, generator=gen) < 0.25
    if layout == "shared":
        p = Problem("shared", q, torch.randn(N, d, generator=gen, dtype=torch.float64),
                    torch.randn(R, d, generator=gen, dtype=torch.float64), neg_mask=mask)
    elif layout == "per_row":
        p = Problem("per_row", q, torch.randn(R, N, d, generator=gen, dtype=torch.float64),
                    torch.randn(R, d, generator=gen, dtype=torch.float64), neg_mask=mask)
    else:
        p = Problem("indexed", q, torch.randn(I, d, generator=gen, dtype=torch.float64),
                    pos_idx=torch.randint(0, I, (R,), generator=gen),
                    neg_idx=torch.randint(0, I, (R, N), generator=gen), neg_mask=mask,
                    log_q=-torch.rand(I, generator=gen, dtype=torch.float64))
    spec = LossSpec(Kind.CONTRASTIVE, eps=1.0, label_smoothing=0.2, z_loss=0.05)
    row_scale = torch.rand(R, generator=gen, dtype=torch.float64)
    leaves = {name: getattr(p, name).clone().requires_grad_() for name in ("query", "neg", "pos")
              if getattr(p, name) is not None}
    (reference.row_losses(dataclasses.replace(p, **leaves), spec) * row_scale).sum().backward()
    want_rows = reference.row_losses(p, spec)

    p32 = dataclasses.replace(p, **{k: v.float() for k, v in leaves.items()},
                              log_q=None if p.log_q is None else p.log_q.float())
    for deterministic in ((False, True) if layout == "indexed" else (False,)):
        if layout == "shared":
            rows, gq, gp, gn = triton_backend.forward_backward(p32, spec, row_scale.float(), (True, True, True))
        else:
            rows, state = triton_backend.forward_state(p32, spec, deterministic)
            gq, gp, gn = triton_backend.backward_from_state(p32, spec, state, row_scale.float(), (True, True, True),
                                                            deterministic)
        torch.testing.assert_close(rows.double(), want_rows, rtol=1e-5, atol=1e-6)
        for name, g in (("query", gq), ("neg", gn), ("pos", gp)):
            if name in leaves:
                torch.testing.assert_close(g.double(), leaves[name].grad, rtol=1e-4, atol=1e-6, msg=name)
