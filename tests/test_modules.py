"""nn.Modules (SPEC §4): a [B, L, d] query with a padding mask equals the functional call on the
flattened non-padded rows, for every layout; reduction='none' returns [B, L]."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import BACKENDS_UNDER_TEST, make_inputs
from torch import Tensor

import fastrecloss
from fastrecloss import functional as F

B, L, N, D = 3, 4, 5, 8
MODULES = [
    (fastrecloss.InfoNCELoss, F.infonce, {}),
    (fastrecloss.InfoNCEPlusLoss, F.infonce_plus, {"eps": 0.3, "lam": 1.2}),
    (fastrecloss.DCLLoss, F.dcl, {}),
    (fastrecloss.MINELoss, F.mine, {}),
    (fastrecloss.MINEPlusLoss, F.mine_plus, {"lam": 1.3}),
    (fastrecloss.BPRLoss, F.bpr, {"neg_reduction": "sum"}),
    (fastrecloss.BCELoss, F.bce, {"beta": 0.5}),
    (fastrecloss.CCLLoss, F.ccl, {"margin": 0.3, "neg_weight": 2.0}),
]
# Layouts and options: per-row arguments of every kind get the [B, L, ...] leading shape.
SETUPS = {
    "shared": ("shared", {"log_q": True, "hits": True, "weight": True}),
    "shared-row-mask": ("shared", {"mask": "row", "pos_log_q": True}),
    "per_row": ("per_row", {"log_q": True, "hits": True, "mask": "row", "weight": True}),
    "indexed": ("indexed", {"log_q": True, "hits": True, "mask": "row", "pos_log_q": True}),
    "indexed-pos-idx": ("indexed", {"pos_idx": True, "hits": True, "weight": True}),
    "in_batch": ("shared", {"in_batch": True, "hits": True}),
}
FLAT_ROW_ARGS = ("query", "pos", "pos_idx", "pos_log_q", "pos_ids", "weight", "neg_idx")


def _per_row_keys(inputs: dict[str, Any], layout: str) -> list[str]:
    """The arguments with one entry per row (they get the [B, L] leading shape)."""
    keys = [k for k in FLAT_ROW_ARGS if k in inputs]
    if layout == "per_row":
        keys += [k for k in ("neg", "log_q") if k in inputs]
    keys += [k for k in ("neg_mask", "neg_ids") if k in inputs and inputs[k].dim() == 2]
    return keys


def _padding(gen: torch.Generator) -> Tensor:
    pad = torch.rand(B, L, generator=gen) < 0.35
    pad[0, -1] = True  # at least one padded row
    pad[0, 0] = False
    return pad


def _split(inputs: dict[str, Any], layout: str, leaves: dict[str, Tensor], pad: Tensor) -> tuple[dict, dict]:
    """(module keywords with [B, L, ...] tensors, functional keywords on the kept rows)."""
    keep = ~pad.flatten()
    mod, fun = {}, {}
    for k, v in inputs.items():
        v = leaves.get(k, v)
        if k in _per_row_keys(inputs, layout):
            mod[k], fun[k] = v.reshape(B, L, *v.shape[1:]), v[keep]
        else:
            mod[k] = fun[k] = v
    return mod, fun


def _call(fn: Any, args: dict[str, Any], **kw: Any) -> Tensor:
    args = dict(args)
    return fn(args.pop("query"), args.pop("pos", None), args.pop("neg", None), **args, **kw)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize(("cls", "fn", "hparams"), MODULES, ids=[m[0].__name__ for m in MODULES])
def test_module_equals_functional_on_kept_rows(cls: type, fn: Any, hparams: dict, setup: str, reduction: str,
                                               backend: str, gen: torch.Generator) -> None:
    layout, opts = SETUPS[setup]
    inputs = {k: (v.float() if isinstance(v, Tensor) and v.is_floating_point() else v)
              for k, v in make_inputs(layout, B * L, N, D, gen=gen, **opts).items()}
    pad = _padding(gen)
    leaves = {k: inputs[k].clone().requires_grad_() for k in ("query", "pos", "neg") if k in inputs}
    mod_args, fun_args = _split(inputs, layout, leaves, pad)
    temperature = mod_args.pop("temperature")
    fun_args.pop("temperature")
    hits = bool(mod_args.pop("remove_accidental_hits", False))
    fun_args.pop("remove_accidental_hits", None)
    module = cls(temperature=temperature, reduction=reduction, backend=backend, remove_accidental_hits=hits,
                 **hparams)
    out = _call(module, mod_args, padding_mask=pad)
    ref = _call(fn, fun_args, temperature=temperature, reduction=reduction, backend=backend,
                remove_accidental_hits=hits, **hparams)
    if reduction == "none":
        assert out.shape == (B, L)
        assert torch.equal(out[pad], torch.zeros_like(out[pad]))
        torch.testing.assert_close(out[~pad], ref)
    else:
        assert out.shape == ()
        torch.testing.assert_close(out, ref)
    upstream = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, list(leaves.values()), upstream)
    want = torch.autograd.grad(ref, list(leaves.values()), upstream[~pad] if reduction == "none" else upstream)
    for k, g, w in zip(leaves, got, want):
        torch.testing.assert_close(g, w, msg=lambda m, k=k: f"grad {k}: {m}")


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softmax_ce_module(reduction: str, backend: str, gen: torch.Generator) -> None:
    table = torch.randn(11, D, generator=gen).requires_grad_()
    query = torch.randn(B, L, D, generator=gen).requires_grad_()
    target = torch.randint(0, 11, (B, L), generator=gen)
    pad = _padding(gen)
    module = fastrecloss.SoftmaxCELoss(temperature=0.7, reduction=reduction, backend=backend)
    out = module(query, table, target, padding_mask=pad)
    ref = F.softmax_ce(query[~pad], table, target[~pad], temperature=0.7, reduction=reduction, backend=backend)
    # The plain PyTorch cross-entropy over the full logits, as an independent check.
    ce = torch.nn.functional.cross_entropy(query[~pad] @ table.T / 0.7, target[~pad],
                                           reduction="mean" if reduction == "mean" else "none")
    if reduction == "none":
        assert out.shape == (B, L)
        assert torch.equal(out[pad], torch.zeros_like(out[pad]))
        torch.testing.assert_close(out[~pad], ref)
        torch.testing.assert_close(out[~pad], ce)
    else:
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(out, ce)
    got = torch.autograd.grad(out.sum(), (query, table))
    want = torch.autograd.grad(ce.sum(), (query, table))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_module_any_leading_shape(gen: torch.Generator) -> None:
    """[d], [R, d] and [B, L, T, d] queries all flatten to rows."""
    table = torch.randn(9, D, generator=gen)
    module = fastrecloss.InfoNCELoss(reduction="none", backend="torch")
    for lead in ((), (6,), (2, 3, 2)):
        q, p = torch.randn(*lead, D, generator=gen), torch.randn(*lead, D, generator=gen)
        out = module(q, p, table)
        assert out.shape == lead
        flat = F.infonce(q.reshape(-1, D), p.reshape(-1, D), table, reduction="none", backend="torch")
        torch.testing.assert_close(out.reshape(-1), flat)


def test_padding_mask_must_be_bool() -> None:
    q = torch.randn(2, 3, D)
    with pytest.raises(TypeError, match="padding_mask"):
        fastrecloss.InfoNCELoss()(q, q, torch.randn(4, D), padding_mask=torch.zeros(2, 3, dtype=torch.long))


def test_module_repr_and_hparams() -> None:
    module = fastrecloss.CCLLoss(margin=0.4, neg_weight=3.0, temperature=0.2)
    text = repr(module)
    assert "margin=0.4" in text and "neg_weight=3.0" in text and "temperature=0.2" in text
