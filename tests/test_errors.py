"""Bad input raises a ValueError/TypeError naming the argument (SPEC §5); nothing is silently broadcast."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from helpers import BACKENDS_UNDER_TEST

import fastrecloss
from fastrecloss import functional as F

R, N, D, I = 4, 5, 8, 10  # noqa: E741 - the item-table size of SPEC §3
_g = torch.Generator().manual_seed(0)
q = torch.randn(R, D, generator=_g)
p = torch.randn(R, D, generator=_g)
neg = torch.randn(N, D, generator=_g)
per_row = torch.randn(R, N, D, generator=_g)
table = torch.randn(I, D, generator=_g)
idx = torch.randint(0, I, (R, N), generator=_g)
pidx = torch.randint(0, I, (R,), generator=_g)
b = torch.bool

# (id, call, exception type, the argument the message must name)
CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # mismatched d
    ("d-neg", lambda: F.infonce(q, p, torch.randn(N, D + 1)), ValueError, "neg"),
    ("d-pos", lambda: F.infonce(q, torch.randn(R, D + 1), neg), ValueError, "pos"),
    ("d-per-row", lambda: F.bpr(q, p, torch.randn(R, N, D - 1)), ValueError, "neg"),
    ("d-table", lambda: F.dcl(q, p, torch.randn(I, D + 2), neg_idx=idx), ValueError, "neg"),
    ("d-in-batch", lambda: F.infonce(q, torch.randn(R, D + 1), None, in_batch=True), ValueError, "pos"),
    # wrong ranks / row counts
    ("rank-query-1d", lambda: F.infonce(q[0], p, neg), ValueError, "query"),
    ("rank-query-3d", lambda: F.infonce(q[None], p, neg), ValueError, "query"),
    ("rank-neg-1d", lambda: F.infonce(q, p, neg[0]), ValueError, "neg"),
    ("rank-neg-4d", lambda: F.infonce(q, p, per_row[None]), ValueError, "neg"),
    ("rank-pos-3d", lambda: F.infonce(q, p[None], neg), ValueError, "pos"),
    ("rows-pos", lambda: F.infonce(q, p[:1], neg), ValueError, "pos"),
    ("rows-per-row-neg", lambda: F.infonce(q, p, per_row[:3]), ValueError, "neg"),
    ("rank-neg-idx", lambda: F.infonce(q, p, table, neg_idx=idx[0]), ValueError, "neg_idx"),
    ("rows-neg-idx", lambda: F.infonce(q, p, table, neg_idx=idx[:1]), ValueError, "neg_idx"),
    ("rank-pos-idx", lambda: F.infonce(q, None, table, neg_idx=idx, pos_idx=pidx[:, None]), ValueError,
     "pos_idx"),
    ("rank-target", lambda: F.softmax_ce(q, table, pidx[:, None]), ValueError, "target"),
    # index out of range
    ("range-neg-idx-high", lambda: F.infonce(q, p, table, neg_idx=idx + I), ValueError, "neg_idx"),
    ("range-neg-idx-negative", lambda: F.infonce(q, p, table, neg_idx=idx - I), ValueError, "neg_idx"),
    ("range-pos-idx", lambda: F.infonce(q, None, table, neg_idx=idx, pos_idx=pidx + I), ValueError, "pos_idx"),
    ("range-pos-idx-shared", lambda: F.bpr(q, None, neg, pos_idx=torch.full((R,), N)), ValueError, "pos_idx"),
    ("range-target", lambda: F.softmax_ce(q, table, torch.full((R,), -1)), ValueError, "target"),
    # integer (or bool) dtypes where embeddings are expected, and float indices
    ("int-query", lambda: F.infonce(q.long(), p, neg), TypeError, "query"),
    ("int-pos", lambda: F.infonce(q, p.int(), neg), TypeError, "pos"),
    ("int-neg", lambda: F.infonce(q, p, neg.long()), TypeError, "neg"),
    ("bool-table", lambda: F.infonce(q, p, table.bool(), neg_idx=idx), TypeError, "neg"),
    ("float-neg-idx", lambda: F.infonce(q, p, table, neg_idx=idx.float()), TypeError, "neg_idx"),
    ("float-pos-idx", lambda: F.infonce(q, None, table, neg_idx=idx, pos_idx=pidx.float()), TypeError, "pos_idx"),
    ("float-target", lambda: F.softmax_ce(q, table, pidx.float()), TypeError, "target"),
    ("list-query", lambda: F.infonce(q.tolist(), p, neg), TypeError, "query"),
    # hyper-parameters that would produce NaN
    ("tau-zero", lambda: F.infonce(q, p, neg, temperature=0.0), ValueError, "temperature"),
    ("tau-negative", lambda: F.infonce(q, p, neg, temperature=-0.1), ValueError, "temperature"),
    ("tau-nan", lambda: F.infonce(q, p, neg, temperature=float("nan")), ValueError, "temperature"),
    ("tau-tensor", lambda: F.infonce(q, p, neg, temperature=torch.tensor(0.5)), TypeError, "temperature"),
    ("tau-inf", lambda: F.infonce(q, p, neg, temperature=float("inf")), ValueError, "temperature"),
    ("label-smoothing-above-1", lambda: F.softmax_ce(q, table, pidx, label_smoothing=1.5), ValueError,
     "label_smoothing"),
    ("label-smoothing-negative", lambda: F.softmax_ce(q, table, pidx, label_smoothing=-0.1), ValueError,
     "label_smoothing"),
    ("z-loss-negative", lambda: F.softmax_ce(q, table, pidx, z_loss=-1e-4), ValueError, "z_loss"),
    ("z-loss-nan", lambda: F.softmax_ce(q, table, pidx, z_loss=float("nan")), ValueError, "z_loss"),
    ("lam-negative", lambda: F.infonce_plus(q, p, neg, lam=-0.1), ValueError, "lam"),
    ("lam-negative-mine", lambda: F.mine_plus(q, p, neg, lam=-1.0), ValueError, "lam"),
    ("lam-nan", lambda: F.mine_plus(q, p, neg, lam=float("nan")), ValueError, "lam"),
    ("eps-negative", lambda: F.infonce_plus(q, p, neg, eps=-1e-3), ValueError, "eps"),
    ("beta-negative", lambda: F.bce(q, p, neg, beta=-1.0), ValueError, "beta"),
    ("margin-inf", lambda: F.ccl(q, p, neg, margin=float("inf")), ValueError, "margin"),
    ("neg-weight-negative", lambda: F.ccl(q, p, neg, neg_weight=-1.0), ValueError, "neg_weight"),
    # unknown choices
    ("reduction", lambda: F.infonce(q, p, neg, reduction="avg"), ValueError, "reduction"),
    ("backend", lambda: F.infonce(q, p, neg, backend="cuda"), ValueError, "backend"),
    ("neg-reduction", lambda: F.bpr(q, p, neg, neg_reduction="max"), ValueError, "neg_reduction"),
    ("neg-reduction-bce", lambda: F.bce(q, p, neg, neg_reduction="none"), ValueError, "neg_reduction"),
    ("module-reduction", lambda: fastrecloss.InfoNCELoss(reduction="avg"), ValueError, "reduction"),
    ("module-backend", lambda: fastrecloss.BPRLoss(backend="gpu"), ValueError, "backend"),
    ("module-temperature", lambda: fastrecloss.DCLLoss(temperature=0.0), ValueError, "temperature"),
    # weight / log_q / pos_log_q / neg_mask: shapes (no broadcasting) and dtypes
    ("weight-short", lambda: F.infonce(q, p, neg, weight=torch.ones(R - 1)), ValueError, "weight"),
    ("weight-scalar", lambda: F.infonce(q, p, neg, weight=torch.tensor(1.0)), ValueError, "weight"),
    ("weight-column", lambda: F.infonce(q, p, neg, weight=torch.ones(R, 1)), ValueError, "weight"),
    ("weight-bool", lambda: F.infonce(q, p, neg, weight=torch.ones(R, dtype=b)), TypeError, "weight"),
    ("weight-int", lambda: F.infonce(q, p, neg, weight=torch.ones(R, dtype=torch.long)), TypeError, "weight"),
    ("weight-negative", lambda: F.infonce(q, p, neg, weight=torch.tensor([1.0, -0.5, 1.0, 1.0])), ValueError,
     "weight"),
    ("weight-nan", lambda: F.bpr(q, p, neg, weight=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError,
     "weight"),
    ("weight-inf", lambda: F.softmax_ce(q, table, pidx, weight=torch.full((R,), float("inf"))), ValueError,
     "weight"),
    # flags must be bool, ignore_index an int
    ("flag-in-batch", lambda: F.infonce(q, p, None, in_batch="yes"), TypeError, "in_batch"),
    ("flag-hits", lambda: F.infonce(q, p, neg, remove_accidental_hits=1, pos_ids=pidx, neg_ids=torch.arange(N)),
     TypeError, "remove_accidental_hits"),
    ("flag-deterministic", lambda: F.bpr(q, p, neg, deterministic="no"), TypeError, "deterministic"),
    ("ignore-index-float", lambda: F.softmax_ce(q, table, pidx, ignore_index=-1.0), TypeError, "ignore_index"),
    # misspelt keywords name the loss function and the keyword
    ("unknown-keyword", lambda: F.infonce(q, p, neg, temprature=0.1), TypeError, "temprature"),
    ("unknown-keyword-softmax", lambda: F.softmax_ce(q, table, pidx, label_smothing=0.1), TypeError,
     "label_smothing"),
    ("module-unknown-keyword", lambda: fastrecloss.InfoNCELoss(temprature=0.1), TypeError, "temprature"),
    ("module-unknown-keyword-hparams", lambda: fastrecloss.BCELoss(beta=0.5, margin=0.1), TypeError, "margin"),
    ("module-bad-hparam", lambda: fastrecloss.MINEPlusLoss(lam=-1.0), ValueError, "lam"),
    ("module-bad-neg-reduction", lambda: fastrecloss.BPRLoss(neg_reduction="max"), ValueError, "neg_reduction"),
    ("module-bad-flag", lambda: fastrecloss.DCLLoss(remove_accidental_hits="yes"), TypeError,
     "remove_accidental_hits"),
    ("module-bad-label-smoothing", lambda: fastrecloss.SoftmaxCELoss(label_smoothing=2.0), ValueError,
     "label_smoothing"),
    ("log-q-shared", lambda: F.infonce(q, p, neg, log_q=torch.zeros(1)), ValueError, "log_q"),
    ("log-q-per-row", lambda: F.infonce(q, p, per_row, log_q=torch.zeros(N)), ValueError, "log_q"),
    ("log-q-indexed", lambda: F.infonce(q, p, table, neg_idx=idx, log_q=torch.zeros(R, N)), ValueError, "log_q"),
    ("log-q-in-batch", lambda: F.infonce(q, p, None, in_batch=True, log_q=torch.zeros(N)), ValueError, "log_q"),
    ("log-q-int", lambda: F.infonce(q, p, neg, log_q=torch.zeros(N, dtype=torch.long)), TypeError, "log_q"),
    ("pos-log-q", lambda: F.infonce(q, p, neg, pos_log_q=torch.zeros(())), ValueError, "pos_log_q"),
    ("neg-mask-broadcast", lambda: F.infonce(q, p, neg, neg_mask=torch.zeros(1, N, dtype=b)), ValueError,
     "neg_mask"),
    ("neg-mask-per-row-1d", lambda: F.infonce(q, p, per_row, neg_mask=torch.zeros(N, dtype=b)), ValueError,
     "neg_mask"),
    ("neg-mask-float", lambda: F.infonce(q, p, neg, neg_mask=torch.zeros(N)), TypeError, "neg_mask"),
    ("neg-mask-list", lambda: F.infonce(q, p, None, in_batch=True, neg_mask=[True] * R), TypeError, "neg_mask"),
    ("neg-mask-in-batch", lambda: F.infonce(q, p, None, in_batch=True, neg_mask=torch.zeros(R, N, dtype=b)),
     ValueError, "neg_mask"),
    # mixed dtypes / devices
    ("mixed-neg", lambda: F.infonce(q, p, neg.double()), TypeError, "neg"),
    ("mixed-pos", lambda: F.infonce(q, p.double(), neg), TypeError, "pos"),
    ("mixed-table", lambda: F.infonce(q.double(), p.double(), table, neg_idx=idx), TypeError, "neg"),
    ("mixed-softmax-table", lambda: F.softmax_ce(q.double(), table, pidx), TypeError, "table"),
    ("mixed-in-batch", lambda: F.infonce(q, p.double(), None, in_batch=True), TypeError, "pos"),
    ("device-neg", lambda: F.infonce(q, p, neg.to("meta")), ValueError, "neg"),
    # accidental hits and positives
    ("hits-no-neg-ids", lambda: F.infonce(q, p, neg, remove_accidental_hits=True, pos_ids=pidx), ValueError,
     "neg_ids"),
    ("hits-no-pos-ids", lambda: F.infonce(q, p, neg, remove_accidental_hits=True, neg_ids=torch.arange(N)),
     ValueError, "pos_ids"),
    ("ids-without-flag", lambda: F.infonce(q, p, neg, pos_ids=pidx, neg_ids=torch.arange(N)), ValueError,
     "remove_accidental_hits"),
    ("neg-ids-shape", lambda: F.infonce(q, p, neg, remove_accidental_hits=True, pos_ids=pidx,
                                        neg_ids=torch.arange(N + 1)), ValueError, "neg_ids"),
    ("pos-ids-float", lambda: F.infonce(q, p, neg, remove_accidental_hits=True, pos_ids=pidx.float(),
                                        neg_ids=torch.arange(N)), TypeError, "pos_ids"),
    ("pos-and-pos-idx", lambda: F.infonce(q, p, table, neg_idx=idx, pos_idx=pidx), ValueError, "pos_idx"),
    ("pos-idx-per-row", lambda: F.infonce(q, None, per_row, pos_idx=pidx), ValueError, "pos_idx"),
    ("no-positive", lambda: F.bpr(q, None, neg), ValueError, "pos"),
    ("no-neg", lambda: F.infonce(q, p, None), ValueError, "neg"),
    ("in-batch-with-neg", lambda: F.infonce(q, p, neg, in_batch=True), ValueError, "neg"),
    ("lse-with-positive", lambda: F.sampled_logsumexp(q, table, neg_idx=idx, pos_idx=pidx), ValueError, "positive"),
    ("softmax-ce-neg-idx", lambda: F.softmax_ce(q, table, pidx, neg_idx=idx), ValueError, "neg_idx"),
    # softmax_ce names its own arguments: table and target (not neg / pos_idx)
    ("softmax-ce-d-table", lambda: F.softmax_ce(q, torch.randn(I, D + 1), pidx), ValueError, "table"),
    ("softmax-ce-int-table", lambda: F.softmax_ce(q, table.long(), pidx), TypeError, "table"),
    ("softmax-ce-3d-table", lambda: F.softmax_ce(q, per_row, pidx), ValueError, "table"),
    ("softmax-ce-no-table", lambda: F.softmax_ce(q, None, pidx), ValueError, "table"),
    ("softmax-ce-target-rows", lambda: F.softmax_ce(q, table, pidx[:2]), ValueError, "target"),
    ("softmax-ce-target-high", lambda: F.softmax_ce(q, table, torch.full((R,), I)), ValueError, "target"),
    ("softmax-ce-target-none", lambda: F.softmax_ce(q, table, None), ValueError, "target"),
    ("range-target-not-ignore-index", lambda: F.softmax_ce(q, table, torch.full((R,), -100), ignore_index=-1),
     ValueError, "target"),
    ("range-neg-idx-not-ignore-index", lambda: F.infonce(q, p, table, neg_idx=idx.clone().fill_(-1)), ValueError,
     "neg_idx"),
    ("in-batch-pos-ids-without-flag", lambda: F.infonce(q, p, None, in_batch=True, pos_ids=pidx), ValueError,
     "remove_accidental_hits"),
    ("in-batch-flag-without-pos-ids", lambda: F.infonce(q, p, None, in_batch=True, remove_accidental_hits=True),
     ValueError, "pos_ids"),
    # modules: the leading shape of per-row arguments must match the query's
    ("module-pos-shape", lambda: fastrecloss.InfoNCELoss()(q.view(2, 2, D), p, neg), ValueError, "pos"),
    ("module-padding-shape", lambda: fastrecloss.InfoNCELoss()(q.view(2, 2, D), p.view(2, 2, D), neg,
                                                               padding_mask=torch.zeros(4, dtype=b)), ValueError,
     "padding_mask"),
]


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize(("call", "exc", "arg"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(call: Callable[[], object], exc: type[Exception], arg: str,
                                      backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Route every call to the backend under test (validation must happen before any backend runs).
    for name in F.__all__:
        fn = getattr(F, name)
        monkeypatch.setattr(F, name, _with_backend(fn, backend))
    with pytest.raises(exc) as info:
        call()
    assert re.search(rf"\b{re.escape(arg)}\b", str(info.value)), f"message does not name {arg!r}: {info.value}"


def _with_backend(fn: Callable[..., object], backend: str) -> Callable[..., object]:
    def call(*args: object, **kwargs: object) -> object:
        kwargs.setdefault("backend", backend)
        return fn(*args, **kwargs)

    return call


# (call, the public function its message must start with)
PREFIXED = [
    (lambda: F.softmax_ce(q, torch.randn(I, D + 1), pidx), "softmax_ce"),
    (lambda: F.infonce(q, p, neg, temperature=0.0), "infonce"),
    (lambda: F.mine_plus(q, p, neg, lam=-1.0), "mine_plus"),
    (lambda: F.bce(q, p, neg, weight=torch.ones(R - 1)), "bce"),
    (lambda: F.ccl(q, p, neg, margin=float("nan")), "ccl"),
    (lambda: F.sampled_logsumexp(q, neg, pos_idx=pidx), "sampled_logsumexp"),
    (lambda: F.bpr(q, p, neg, temprature=1.0), "bpr"),
]


@pytest.mark.parametrize(("call", "fn"), PREFIXED, ids=[f for _, f in PREFIXED])
def test_errors_name_the_public_function(call: Callable[[], object], fn: str) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert str(info.value).startswith(f"{fn}: "), info.value
    assert "compute_loss" not in str(info.value)


def test_errors_raise_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation happens before a backend runs: a failing backend is never reached on bad input."""
    from fastrecloss.backends import torch as torch_backend

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the backend ran on invalid input")

    monkeypatch.setattr(torch_backend, "forward_backward", boom)
    with pytest.raises(ValueError, match="neg_idx"):
        F.infonce(q, p, table, neg_idx=idx + I, backend="torch")
