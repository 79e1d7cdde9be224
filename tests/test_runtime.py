"""Runtime behaviour (SPEC §5): double backward fails loudly, no host synchronisation in the
forward or backward, and an eager CPU call imports neither triton nor dynamo/inductor."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import BACKENDS_UNDER_TEST, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import fastrecloss._problem as problem
from fastrecloss import functional as F

FUSED = [b for b in BACKENDS_UNDER_TEST if b != "reference"]
# (layout, loss, reduction): the fused scalar op (mean / sum) and the recomputing per-row op (none).
PATHS = [("shared", "infonce", "mean"), ("shared", "bce", "none"), ("indexed", "mine", "mean"),
         ("per_row", "bpr", "sum")]


def _call(layout: str, loss: str, reduction: str, gen: torch.Generator, backend: str):
    inputs = make_inputs(layout, 5, 4, 6, gen=gen, log_q=True, hits=True, pos_idx=layout == "indexed")
    args = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    leaves = [args[k].requires_grad_() for k in ("query", "pos", "neg") if k in args]
    rest = {k: v for k, v in args.items() if k not in ("query", "pos", "neg")}
    out = getattr(F, loss)(args["query"], args.get("pos"), args["neg"], backend=backend, reduction=reduction, **rest)
    return out.sum(), leaves


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(("layout", "loss", "reduction"), PATHS)
def test_double_backward_raises_clearly(backend: str, layout: str, loss: str, reduction: str,
                                        gen: torch.Generator) -> None:
    """create_graph=True still gives the right first-order gradients, but differentiating them
    (a gradient penalty) raises an error naming double backward / create_graph."""
    total, leaves = _call(layout, loss, reduction, gen, backend)
    plain = torch.autograd.grad(total, leaves, retain_graph=True)
    first = torch.autograd.grad(total, leaves, create_graph=True)
    for a, b in zip(first, plain):
        torch.testing.assert_close(a.detach(), b)
    penalty = sum((g ** 2).sum() for g in first)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True"):
        penalty.backward()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", ["shared", "per_row", "indexed"])
def test_retained_graph_gives_the_same_gradients_twice(backend: str, layout: str) -> None:
    """The fused op scales its saved gradients by the upstream gradient in place only when the graph
    is freed: with retain_graph=True a second backward (upstream 2.5, not 1) gives the same
    gradients, and the last one (graph freed, scaled in place) still equals the reference's."""
    ref_total, ref_leaves = _call(layout, "infonce", "mean", torch.Generator().manual_seed(7), "reference")
    want = torch.autograd.grad(2.5 * ref_total, ref_leaves)
    total, leaves = _call(layout, "infonce", "mean", torch.Generator().manual_seed(7), backend)
    twice = [torch.autograd.grad(2.5 * total, leaves, retain_graph=True) for _ in range(2)]
    last = torch.autograd.grad(2.5 * total, leaves)
    for first, second, freed, w in zip(*twice, last, want):
        torch.testing.assert_close(first, w)
        torch.testing.assert_close(second, w)
        torch.testing.assert_close(freed, w)


def test_reference_supports_double_backward(gen: torch.Generator) -> None:
    """The reference is plain autograd: a gradient penalty through it is exact (checked by gradgradcheck)."""
    q = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 2, 4, 1])
    assert torch.autograd.gradgradcheck(lambda a, b: F.softmax_ce(a, b, target, backend="reference"), (q, v))


class _SyncRecorder(TorchDispatchMode):
    """Records every op that reads a tensor's value back to Python (.item(), bool(t), int(t) …)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                    torch.ops.aten.is_nonzero.default):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize(("layout", "loss", "reduction"), PATHS + [("shared", "softmax_ce", "mean")])
def test_no_host_sync_in_forward_or_backward(backend: str, layout: str, loss: str, reduction: str,
                                             gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the value checks off (as on CUDA without the debug flag), a whole call — validation,
    forward and backward — never reads a tensor value back to the host."""
    if backend == "triton":
        pytest.skip("the Triton interpreter reads kernel arguments on the host by design")
    monkeypatch.setattr(problem, "values_checked", lambda t: False)
    with _SyncRecorder() as rec:
        if loss == "softmax_ce":
            q = torch.randn(5, 6, generator=gen, requires_grad=True)
            table = torch.randn(9, 6, generator=gen, requires_grad=True)
            target = torch.tensor([0, 3, -100, 8, 2])
            total = F.softmax_ce(q, table, target, label_smoothing=0.1, z_loss=1e-3, backend=backend)
            leaves = [q, table]
        else:
            total, leaves = _call(layout, loss, reduction, gen, backend)
        total.backward()
    assert all(leaf.grad is not None for leaf in leaves)
    assert not rec.syncs, f"host syncs: {rec.syncs}"


def test_value_checks_do_read_back_on_cpu(gen: torch.Generator) -> None:
    """The recorder above sees the reads the CPU value checks make (so its silence means something)."""
    with _SyncRecorder() as rec:
        F.softmax_ce(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), backend="torch")
    assert rec.syncs


def test_eager_cpu_call_imports_neither_triton_nor_inductor() -> None:
    code = (
        "import sys, torch, fastrecloss\n"
        "import fastrecloss.functional as F\n"
        "q = torch.randn(8, 4, requires_grad=True)\n"
        "F.softmax_ce(q, torch.randn(10, 4), torch.randint(0, 10, (8,))).backward()\n"
        "F.infonce(q, torch.randn(8, 4), None, in_batch=True, backend='torch', reduction='none').sum().backward()\n"
        "F.bpr(q, None, torch.randn(10, 4), pos_idx=torch.zeros(8, dtype=torch.long),\n"
        "      neg_idx=torch.zeros(8, 3, dtype=torch.long)).backward()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'sympy')\n"
        "               or m.startswith(('torch._dynamo', 'torch._inductor')))\n"
        "print(heavy[:5])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PATH": "", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
