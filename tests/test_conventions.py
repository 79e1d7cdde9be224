"""PyTorch conventions (README "Conventions", SPEC §2, §4, §5), each against an independent
``F.cross_entropy``-based (or hand-written) reference: logQ on the positive, ``ignore_index``,
label smoothing and z-loss, and the ``pos_ids`` / 2-D ``neg`` rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from helpers import BACKENDS_UNDER_TEST, LossCase, check_case, make_inputs
from torch import Tensor

import fastrecloss
from fastrecloss import functional as F
from fastrecloss._problem import build_problem
from fastrecloss._spec import LossSpec, contrastive
from fastrecloss.backends import reference
from fastrecloss.backends import torch as torch_backend

ALL_BACKENDS = ["reference", *BACKENDS_UNDER_TEST]
backends = pytest.mark.parametrize("backend", ALL_BACKENDS)
R, D, I, TAU = 6, 8, 11, 0.7  # noqa: E741 - the item-table size of SPEC §3


def _leaves(gen: torch.Generator, *shapes: tuple[int, ...]) -> list[Tensor]:
    return [(torch.randn(*s, generator=gen, dtype=torch.float64) * 0.6).requires_grad_() for s in shapes]


def _assert_same(got: Tensor, want: Tensor, inputs: list[Tensor], atol: float = 1e-6) -> None:
    """Loss and the gradient of every input agree (fp64 inputs: the fused backends return fp64)."""
    torch.testing.assert_close(got, want, rtol=1e-6, atol=atol)
    up = torch.randn(got.shape, generator=torch.Generator().manual_seed(5), dtype=got.dtype)
    g_got = torch.autograd.grad(got, inputs, up, retain_graph=True, allow_unused=True)
    g_want = torch.autograd.grad(want, inputs, up, retain_graph=True, allow_unused=True)
    for k, (a, b) in enumerate(zip(g_got, g_want)):
        a = torch.zeros_like(inputs[k]) if a is None else a
        b = torch.zeros_like(inputs[k]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-6, atol=atol, msg=lambda m, k=k: f"grad {k}: {m}")


# --- logQ on the positive ----------------------------------------------------------------------


@backends
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_in_batch_log_q_corrects_the_positive(backend: str, reduction: str, gen: torch.Generator) -> None:
    """In-batch softmax with logQ = cross_entropy(q pᵀ/τ − log_q, arange(R)) (Yi et al. 2019, TFRS)."""
    q, p = _leaves(gen, (R, D), (R, D))
    log_q = torch.log(torch.rand(R, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    got = F.infonce(q, p, None, in_batch=True, log_q=log_q, temperature=TAU, backend=backend, reduction=reduction)
    want = TF.cross_entropy(q @ p.T / TAU - log_q, torch.arange(R), reduction=reduction)
    _assert_same(got, want, [q, p])
    # pos_log_q overrides the default: zeros leave the positive uncorrected (the old behaviour).
    raw = F.infonce(q, p, None, in_batch=True, log_q=log_q, pos_log_q=torch.zeros(R, dtype=torch.float64),
                    temperature=TAU, backend=backend, reduction=reduction)
    logits = q @ p.T / TAU - log_q
    logits = logits + torch.diag(log_q)  # the diagonal (the positives) without the correction
    _assert_same(raw, TF.cross_entropy(logits, torch.arange(R), reduction=reduction), [q, p])


@backends
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softmax_ce_log_q_is_cross_entropy_of_corrected_logits(backend: str, reduction: str,
                                                              gen: torch.Generator) -> None:
    q, table = _leaves(gen, (R, D), (I, D))
    target = torch.randint(0, I, (R,), generator=gen)
    log_q = torch.log(torch.rand(I, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    got = F.softmax_ce(q, table, target, log_q=log_q, temperature=TAU, backend=backend, reduction=reduction)
    want = TF.cross_entropy(q @ table.T / TAU - log_q, target, reduction=reduction)
    _assert_same(got, want, [q, table])


@backends
@pytest.mark.parametrize("loss", ["infonce", "dcl"])
def test_indexed_pos_idx_gets_its_own_log_q(backend: str, loss: str, gen: torch.Generator) -> None:
    """A positive that is a table row (pos_idx) with a per-item log_q [I] is corrected by log_q[pos_idx]."""
    q, table = _leaves(gen, (R, D), (I, D))
    pos_idx = torch.randint(0, I, (R,), generator=gen)
    neg_idx = torch.randint(0, I, (R, 4), generator=gen)
    log_q = torch.log(torch.rand(I, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    got = getattr(F, loss)(q, None, table, pos_idx=pos_idx, neg_idx=neg_idx, log_q=log_q, temperature=TAU,
                           backend=backend)
    s_pos = (q * table[pos_idx]).sum(1) / TAU - log_q[pos_idx]
    s_neg = torch.einsum("rd,rnd->rn", q, table[neg_idx]) / TAU - log_q[neg_idx]
    logits = torch.cat([s_pos[:, None], s_neg], dim=1) if loss == "infonce" else s_neg
    want = (torch.logsumexp(logits, dim=1) - s_pos).mean()
    _assert_same(got, want, [q, table])


def test_log_q_default_only_where_the_positive_is_a_candidate(gen: torch.Generator) -> None:
    """pos vectors (not a candidate log_q indexes) stay uncorrected; pos_idx into the shared table is."""
    q, p, neg = (t.detach() for t in _leaves(gen, (R, D), (R, D), (5, D)))
    log_q = torch.randn(5, generator=gen, dtype=torch.float64)
    assert build_problem(q, p, neg, log_q=log_q).pos_log_q is None
    pos_idx = torch.randint(0, 5, (R,), generator=gen)
    torch.testing.assert_close(build_problem(q, None, neg, pos_idx=pos_idx, log_q=log_q).pos_log_q, log_q[pos_idx])
    explicit = torch.randn(R, generator=gen, dtype=torch.float64)
    assert build_problem(q, None, neg, pos_idx=pos_idx, log_q=log_q, pos_log_q=explicit).pos_log_q is explicit


# --- ignore_index --------------------------------------------------------------------------------


@backends
@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softmax_ce_ignore_index_is_cross_entropys(backend: str, ignore_index: int, reduction: str,
                                                   gen: torch.Generator) -> None:
    q, table = _leaves(gen, (R, D), (I, D))
    target = torch.randint(1, I, (R,), generator=gen)
    target[[1, 4]] = ignore_index
    kw = {} if ignore_index == -100 else {"ignore_index": ignore_index}
    got = F.softmax_ce(q, table, target, temperature=TAU, backend=backend, reduction=reduction, **kw)
    want = TF.cross_entropy(q @ table.T / TAU, target, reduction=reduction, **kw)
    _assert_same(got, want, [q, table])
    if reduction == "none":
        assert torch.equal(got[[1, 4]], torch.zeros(2, dtype=got.dtype))


@backends
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_gives_zero(backend: str, reduction: str, gen: torch.Generator) -> None:
    """Unlike F.cross_entropy's mean (NaN), every ignored row gives 0 and zero gradients (SPEC §5)."""
    q, table = _leaves(gen, (R, D), (I, D))
    loss = F.softmax_ce(q, table, torch.full((R,), -100), backend=backend, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in torch.autograd.grad(loss.sum(), (q, table)):
        assert torch.equal(g, torch.zeros_like(g))


@backends
@pytest.mark.parametrize("ignore_index", [-100, -1, 2])
@pytest.mark.parametrize("loss", ["infonce", "mine_plus", "bce", "bpr"])
def test_neg_idx_ignore_index_is_a_masked_negative(backend: str, ignore_index: int, loss: str,
                                                   gen: torch.Generator) -> None:
    """A padded negative id (neg_idx == ignore_index) equals that negative masked with neg_mask."""
    q, p, table = _leaves(gen, (R, D), (R, D), (I, D))
    neg_idx = torch.randint(3, I, (R, 5), generator=gen)
    pad = torch.rand(R, 5, generator=gen) < 0.3
    pad[0] = True  # a row without any negative
    padded = neg_idx.masked_fill(pad, ignore_index)
    kw = {} if ignore_index == -100 else {"ignore_index": ignore_index}
    fn = getattr(F, loss)
    got = fn(q, p, table, neg_idx=padded, temperature=TAU, backend=backend, reduction="none", **kw)
    want = fn(q, p, table, neg_idx=neg_idx, neg_mask=pad, temperature=TAU, backend="reference", reduction="none")
    _assert_same(got, want, [q, p, table])


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("layout_rows", ["fused", "rows"])
def test_backends_mask_indices_outside_the_table(backend: str, layout_rows: str, gen: torch.Generator) -> None:
    """What a CUDA call without range checks hands the backends: indices < 0 or ≥ I are masked
    negatives, read and written nowhere (the table's gradient stays that of the valid entries)."""
    q, table = (t.detach() for t in _leaves(gen, (R, D), (I, D)))
    pos_idx = torch.randint(0, I, (R,), generator=gen)
    neg_idx = torch.randint(0, I, (R, 5), generator=gen)
    bad = torch.rand(R, 5, generator=gen) < 0.4
    wild = neg_idx.masked_fill(bad, I + 7)
    wild[:, 0] = torch.where(bad[:, 0], -3, wild[:, 0])
    spec = contrastive(1.0, 1.0, 0.0)
    row_scale = torch.rand(R, generator=gen, dtype=torch.float64)
    masked = build_problem(q, None, table, pos_idx=pos_idx, neg_idx=neg_idx, neg_mask=bad)
    p = build_problem(q, None, table, pos_idx=pos_idx, neg_idx=neg_idx)
    p.neg_idx = wild  # bypasses the CPU range check, as on CUDA
    if backend == "torch":
        got = torch_backend.forward_backward(p, spec, row_scale, (True, False, True))
        want = torch_backend.forward_backward(masked, spec, row_scale, (True, False, True))
        for a, b in zip(got, want):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(reference.row_losses(p, spec), reference.row_losses(masked, spec))


def test_out_of_range_targets_are_ignored_where_unchecked(gen: torch.Generator,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the range check (CUDA, no debug flag) a target outside the table is ignored, not read."""
    import fastrecloss._problem as problem

    monkeypatch.setattr(problem, "values_checked", lambda t: False)
    q, table = _leaves(gen, (R, D), (I, D))
    target = torch.randint(0, I, (R,), generator=gen)
    wild = target.clone()
    wild[2], wild[3] = I + 100, -7
    got = F.softmax_ce(q, table, wild, backend="torch", reduction="none")
    want = F.softmax_ce(q, table, target.masked_fill(torch.isin(torch.arange(R), torch.tensor([2, 3])), -100),
                        backend="reference", reduction="none")
    _assert_same(got, want, [q, table])


# --- label smoothing and z-loss ------------------------------------------------------------------


def _ce_smoothed(logits: Tensor, target: Tensor, alpha: float, z: float, reduction: str) -> Tensor:
    rows = TF.cross_entropy(logits, target, label_smoothing=alpha, reduction="none")
    rows = rows + z * torch.logsumexp(logits, dim=1) ** 2
    return {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]


@backends
@pytest.mark.parametrize(("alpha", "z"), [(0.1, 0.0), (0.0, 1e-2), (0.25, 0.05), (1.0, 0.0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_and_z_loss_match_cross_entropy(backend: str, alpha: float, z: float, reduction: str,
                                                        gen: torch.Generator) -> None:
    q, table = _leaves(gen, (R, D), (I, D))
    target = torch.randint(0, I, (R,), generator=gen)
    log_q = torch.log(torch.rand(I, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    got = F.softmax_ce(q, table, target, log_q=log_q, temperature=TAU, label_smoothing=alpha, z_loss=z,
                       backend=backend, reduction=reduction)
    want = _ce_smoothed(q @ table.T / TAU - log_q, target, alpha, z, reduction)
    _assert_same(got, want, [q, table])


@backends
def test_label_smoothing_with_ignored_rows_and_a_module(backend: str, gen: torch.Generator) -> None:
    """SoftmaxCELoss(label_smoothing, z_loss) on [B, L] queries with −100 targets = cross_entropy's mean."""
    q, table = _leaves(gen, (2, 3, D), (I, D))
    target = torch.randint(0, I, (2, 3), generator=gen)
    target[0, 2] = target[1, 0] = -100
    module = fastrecloss.SoftmaxCELoss(temperature=TAU, label_smoothing=0.2, z_loss=1e-2, backend=backend)
    got = module(q, table, target)
    logits, flat = q.reshape(-1, D) @ table.T / TAU, target.reshape(-1)
    keep = flat != -100
    want = _ce_smoothed(logits[keep], flat[keep], 0.2, 1e-2, "mean")
    _assert_same(got, want, [q, table])
    padded = module(q, table, target.clamp_min(0), padding_mask=target == -100)
    _assert_same(padded, want, [q, table])


@pytest.mark.parametrize("tiles", [1, 3])
@pytest.mark.parametrize("mask", [False, True])
def test_label_smoothing_oracle_over_tiles_and_masks(tiles: int, mask: bool, gen: torch.Generator,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch backend's item tiles (shared) and masked candidates against the float64 oracle."""
    monkeypatch.setattr(torch_backend, "MIN_GEMM_ROWS", 1)
    monkeypatch.setattr(torch_backend, "TILE_ELEMENTS", 9 * 4 // tiles)
    inputs = make_inputs("shared", 9, 12, 8, gen=gen, pos_idx=True, log_q=True, mask="row" if mask else None,
                         weight=True)
    case = LossCase("softmax_ce_smoothed", "softmax_ce", {"label_smoothing": 0.15, "z_loss": 0.02})
    for reduction in ("mean", "none"):
        check_case(case, "torch", inputs, torch.float32, reduction=reduction)
        check_case(case, "torch", inputs, torch.bfloat16, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_gradcheck(reduction: str, gen: torch.Generator) -> None:
    q, table = _leaves(gen, (4, 5), (7, 5))
    target = torch.tensor([0, 3, -100, 6])
    mask = torch.rand(4, 7, generator=gen) < 0.3
    mask[torch.arange(4), target.clamp_min(0)] = False

    def call(q: Tensor, table: Tensor) -> Tensor:
        return F.softmax_ce(q, table, target, neg_mask=mask, temperature=0.5, label_smoothing=0.3, z_loss=0.1,
                            backend="torch", reduction=reduction)

    assert torch.autograd.gradcheck(call, (q, table), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_label_smoothing_is_for_contrastive_kinds_only() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        LossSpec(fastrecloss.Kind.BCE, label_smoothing=0.1)


# --- pos_ids and the 2-D neg rule ----------------------------------------------------------------


@backends
def test_in_batch_pos_ids_equal_the_shared_layout(backend: str, gen: torch.Generator) -> None:
    """In-batch mode with remove_accidental_hits=True and pos_ids is the shared layout over the
    positives with pos_ids = neg_ids: the own column and every duplicate of the row's item excluded."""
    q, p = _leaves(gen, (R, D), (R, D))
    ids = torch.tensor([3, 1, 3, 2, 1, 5])
    got = F.infonce(q, p, None, in_batch=True, remove_accidental_hits=True, pos_ids=ids, temperature=TAU,
                    backend=backend, reduction="none")
    want = F.infonce(q, p, p, remove_accidental_hits=True, pos_ids=ids, neg_ids=ids, temperature=TAU,
                     backend="reference", reduction="none")
    _assert_same(got, want, [q, p])
    hits = ids[:, None] == ids[None, :]
    logits = (q @ p.T / TAU).masked_fill(hits & ~torch.eye(R, dtype=torch.bool), float("-inf"))
    _assert_same(got, TF.cross_entropy(logits, torch.arange(R), reduction="none"), [q, p])


@backends
def test_one_negative_per_row_recipe(backend: str, gen: torch.Generator) -> None:
    """A 2-D neg [R, d] is a shared pool of R items; neg[:, None] ([R, 1, d]) is one negative per row."""
    q, p, neg = _leaves(gen, (R, D), (R, D), (R, D))
    per_row = F.bce(q, p, neg[:, None], backend=backend, reduction="none")
    want = TF.softplus(-(q * p).sum(1)) + TF.softplus((q * neg).sum(1))
    _assert_same(per_row, want, [q, p, neg])
    pool = F.bce(q, p, neg, backend=backend, reduction="none")
    assert not torch.allclose(pool, want)  # the shared reading averages over all R rows' negatives
