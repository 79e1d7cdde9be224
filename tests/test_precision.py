"""Dtypes (SPEC §5): autocast, a 16-bit query against an fp32 table, and loss scaling — fp32
accumulation, the loss in fp32, each gradient in its own input's dtype, and gradients kept in fp32
until the upstream gradient (a GradScaler's scale) has been applied."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from helpers import BACKENDS_UNDER_TEST, make_inputs
from torch import Tensor, nn

from fastrecloss import functional as F

ALL_BACKENDS = ["reference", *BACKENDS_UNDER_TEST]
backends = pytest.mark.parametrize("backend", ALL_BACKENDS)
R, D, I = 6, 16, 13  # noqa: E741 - the item-table size of SPEC §3
BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def _oracle_ce(query: Tensor, table: Tensor, target: Tensor, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """float64 cross_entropy on the exact values given: (loss, ∂/∂query, ∂/∂table)."""
    q, t = query.detach().double().requires_grad_(), table.detach().double().requires_grad_()
    loss = TF.cross_entropy(q @ t.T / tau, target)
    return loss, *torch.autograd.grad(loss, (q, t))


@backends
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_cpu_autocast_with_an_fp32_table(backend: str, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Under CPU autocast a Linear gives a 16-bit query while the item table stays fp32 — the case
    that used to raise TypeError. The loss comes back in fp32 (like F.cross_entropy under
    autocast) and is the fp32 cross-entropy of those exact values; every gradient has its input's dtype."""
    proj = nn.Linear(D, D)
    table = nn.Parameter(torch.randn(I, D, generator=gen) * 0.3)
    x = torch.randn(R, D, generator=gen)
    target = torch.randint(0, I, (R,), generator=gen)
    with torch.autocast("cpu", dtype=dtype):
        query = proj(x)
        query.retain_grad()
        assert query.dtype == dtype and table.dtype == F32
        loss = F.softmax_ce(query, table, target, temperature=0.5, backend=backend)
        assert loss.dtype == F32
        ce = TF.cross_entropy(query @ table.T / 0.5, target)  # what a user compares against
    loss.backward()
    assert query.grad.dtype == dtype and table.grad.dtype == F32 and proj.weight.grad.dtype == F32
    o_loss, o_gq, o_gt = _oracle_ce(query, table, target, 0.5)
    torch.testing.assert_close(loss.double(), o_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table.grad.double(), o_gt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(query.grad.double(), o_gq, rtol=2e-2, atol=1e-3)  # rounded to 16 bits
    torch.testing.assert_close(loss, ce, rtol=2e-2, atol=2e-2)  # autocast's own 16-bit logits


@backends
@pytest.mark.parametrize("layout", ["shared", "per_row", "indexed"])
def test_16bit_query_against_fp32_negatives(backend: str, layout: str, gen: torch.Generator) -> None:
    """No autocast: a bf16 query (and positives) with fp32 negatives is computed in fp32 from the
    exact values; loss fp32, gradients bf16 / fp32 as their inputs."""
    inputs = make_inputs(layout, R, 5, D, gen=gen, log_q=True, pos_idx=layout == "indexed")
    args = {k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    args["query"] = args["query"].to(BF16)
    if "pos" in args:
        args["pos"] = args["pos"].to(BF16)
    leaves = {k: args[k].requires_grad_() for k in ("query", "pos", "neg") if k in args}
    rest = {k: v for k, v in args.items() if k not in leaves}
    loss = F.infonce(args["query"], args.get("pos"), args["neg"], backend=backend, **rest)
    assert loss.dtype == F32
    grads = torch.autograd.grad(loss, list(leaves.values()))
    exact = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    oracle = F.infonce(exact["query"], exact.get("pos"), exact["neg"], backend="reference",
                       **{k: v.double() if isinstance(v, Tensor) and v.is_floating_point() else v
                          for k, v in rest.items()})
    o_grads = torch.autograd.grad(oracle, list(exact.values()))
    torch.testing.assert_close(loss.double(), oracle, rtol=1e-5, atol=1e-6)
    for (k, leaf), g, o in zip(leaves.items(), grads, o_grads):
        assert g.dtype == leaf.dtype, k
        tol = 1e-5 if leaf.dtype == F32 else 2e-2
        torch.testing.assert_close(g.double(), o, rtol=tol, atol=tol * o.abs().max().item(), msg=k)


@backends
def test_all_16bit_under_autocast_returns_fp32(backend: str, gen: torch.Generator) -> None:
    q, p, n = (torch.randn(R, D, generator=gen).to(BF16).requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=BF16):
        loss = F.bce(q, p, n, backend=backend)
    plain = F.bce(q, p, n, backend=backend)
    assert loss.dtype == F32 and plain.dtype == BF16  # outside autocast: the inputs' dtype
    loss.backward()
    assert q.grad.dtype == BF16
    torch.testing.assert_close(loss.to(BF16), plain)


def test_float64_is_not_mixed(gen: torch.Generator) -> None:
    with pytest.raises(TypeError, match="neg"):
        F.infonce(torch.randn(R, D, dtype=F64), torch.randn(R, D, dtype=F64), torch.randn(5, D))


# --- loss scaling ---------------------------------------------------------------------------------

SCALE = 2.0 ** 15  # a GradScaler-sized upstream gradient that still fits fp16 (max 65504)


@backends
@pytest.mark.parametrize("layout", ["shared", "indexed"])
@pytest.mark.parametrize("loss", ["infonce", "bce"])
def test_loss_scale_protects_small_fp16_gradients(backend: str, layout: str, loss: str,
                                                  gen: torch.Generator) -> None:
    """The catalogue-scale coefficient at small size: fp32 row weights of 2^-27 (the size of the
    softmax coefficient 1/(R·I) at R = 4096, I = 32768) make almost every gradient entry smaller
    than half fp16's smallest subnormal (6e-8), so unscaled they flush to 0 — times the scale
    they are representable. Cast to fp16 before the scale is applied (as before), the table
    gradient came back all 0."""
    inputs = make_inputs(layout, R, 7, D, gen=gen, pos_idx=True)
    weight = torch.full((R,), 2.0 ** -27)
    exact = {k: v.to(F16).double() if k in ("query", "neg") else v for k, v in inputs.items()}
    leaf = exact["neg"].clone().requires_grad_()
    kw = {k: v for k, v in exact.items() if k not in ("query", "neg")}
    oracle = getattr(F, loss)(exact["query"], None, leaf, weight=weight.double(), reduction="sum",
                              backend="reference", **kw)
    (o_grad,) = torch.autograd.grad(oracle * SCALE, leaf)
    assert ((o_grad / SCALE).to(F16) == 0).float().mean() > 0.9  # the premise: unscaled, it underflows
    table = exact["neg"].to(F16).requires_grad_()
    out = getattr(F, loss)(exact["query"].to(F16), None, table, weight=weight, reduction="sum", backend=backend, **kw)
    out.backward(torch.tensor(SCALE, dtype=out.dtype))
    assert table.grad.dtype == F16
    assert (table.grad != 0).float().mean() > 0.9, "the scaled table gradient underflowed"
    torch.testing.assert_close(table.grad.double(), o_grad, rtol=2e-2, atol=2e-2 * o_grad.abs().max().item())
