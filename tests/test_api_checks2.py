"""Regression tests for the bugs the second independent check (the non-loss public API: ranking, metrics,
sampling, distributed, modules, CLI) found: each failed before its fix. The multi-process ones (ring and
sharded-loss errors across ranks) are cases of tests/test_distributed.py's single launch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_ranking import brute_rank, brute_scores, brute_topk, csr, make, neighbour_exclusions
from torch import Tensor

import fastrecloss
from fastrecloss import distributed as D
from fastrecloss import functional as F
from fastrecloss import ranking
from fastrecloss.cli import main as cli
from fastrecloss.recsys import metrics as M
from fastrecloss.sampling import NegativeSampler, in_batch_log_q

BACKENDS = ("reference", "torch", "triton")


# ------------------------------------------------------------------------------------------------
# ranking


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.3, 0.7])
def test_target_rank_ties_survive_a_temperature_that_is_not_a_power_of_two(backend, temperature, gen):
    """The torch path scaled its tiles by x·(1/τ) but the target's score by x/τ: equal scores differed in the
    last bit, so ties counted as ahead (or not) — 1–16 ranks off per case at τ = 0.3, 0.7, 3 (τ = 0.5 of the
    ranking tests is exact either way)."""
    q, table, target = make(gen, 30, 60, 8)
    scores = brute_scores(q, table, temperature)
    excluded = neighbour_exclusions(gen, scores, target)
    for ties in ranking.TIES:
        got = ranking.target_rank(q.float(), table.float(), target, exclude=csr(excluded), temperature=temperature,
                                  ties=ties, backend=backend)
        assert got.tolist() == brute_rank(scores, target, excluded, ties), ties


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_ties_between_plus_and_minus_zero_go_by_id(backend):
    """−0.0 and +0.0 tie, so the lower id comes first; the torch path's int64 key read −0.0's sign bit and put
    every +0.0 first (d = 1: 1·(−0.0) is −0.0, −1·0.0 too)."""
    q = torch.tensor([[1.0], [-1.0]])
    table = torch.tensor([[1.0], [0.0], [-0.0], [2.0], [0.0], [-2.0]])
    vals, ids = ranking.topk(q, table, 4, temperature=0.7, backend=backend)
    scores = brute_scores(q, table, 0.7)
    want_vals, want_ids = brute_topk(scores, [[], []], 4)
    assert ids.tolist() == want_ids
    torch.testing.assert_close(vals, torch.tensor(want_vals, dtype=torch.float32))


@pytest.mark.parametrize("backend", ["reference", "torch"])  # the kernel never saw autocast (44 s interpreted)
def test_ranking_under_autocast_is_the_fp32_ranking(backend, gen):
    """Under CPU autocast the reference's and the torch path's matmuls ran in bf16: 15 (reference) and 12
    (torch) of 50 ranks moved, the reference's top-10 lists too."""
    q, table = torch.randn(50, 32, generator=gen), torch.randn(400, 32, generator=gen)
    target = torch.randint(0, 400, (50,), generator=gen)
    want = ranking.target_rank(q, table, target, backend=backend)
    want_vals, want_ids = ranking.topk(q, table, 10, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ranking.target_rank(q, table, target, backend=backend)
        vals, ids = ranking.topk(q, table, 10, backend=backend)
    assert torch.equal(got, want) and torch.equal(ids, want_ids) and torch.equal(vals, want_vals)
    assert vals.dtype == torch.float32


def test_auto_topk_beyond_the_kernels_widest_list_uses_the_torch_path(monkeypatch, gen):
    """'auto' on CUDA picks triton, whose top-k stops at k = 256: a valid k raised ValueError there."""
    monkeypatch.setattr(ranking, "resolve_backend", lambda backend, query: "triton" if backend == "auto" else backend)
    q, table = torch.randn(3, 4, generator=gen), torch.randn(300, 4, generator=gen)
    with pytest.raises(ValueError, match="supports 1 <= k <= 256"):
        ranking.topk(q, table, 257, backend="triton")
    vals, ids = ranking.topk(q, table, 257)
    want_vals, want_ids = ranking.topk(q, table, 257, backend="reference")
    assert torch.equal(ids, want_ids) and torch.equal(vals, want_vals)


# ------------------------------------------------------------------------------------------------
# metrics


def test_metric_targets_are_validated_and_are_a_set():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    with pytest.raises(TypeError, match="targets must be an integer tensor"):  # was silently truncated to int
        M.rank_metrics(scores, torch.tensor([1.7]), (2,))
    with pytest.raises(TypeError, match="targets must be an integer tensor"):  # True read as item 1
        M.rank_metrics(scores, torch.tensor([True]), (2,))
    with pytest.raises(ValueError, match="targets must be an integer tensor"):  # was a RuntimeError from gather
        M.rank_metrics(scores, torch.zeros(1, 1, 1, dtype=torch.long), (2,))
    # a repeated target counted twice: NDCG@2 of [[1, 1]] was 1.226 > 1
    once = M.rank_metrics(scores, [[1]], (2,))
    for targets in ([[1, 1]], torch.tensor([[1, 1]]), torch.tensor([[1, -1, 1]])):
        got = M.rank_metrics(scores, targets, (2,))
        assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in once.items()}
    table = torch.eye(4)
    twice = M.streaming_full_ranking(lambda u: scores[u], table, [0], [[1, 1]], None, (2,), backend="torch")
    assert twice == M.full_ranking(lambda u: scores[u], [0], [[1]], None, (2,))
    assert twice["ndcg@2"] == pytest.approx(1 / math.log2(3))


def test_history_and_cutoffs_are_validated():
    scores = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"history must hold item columns in \[0, 5\), got -1"):  # masked item 4
        M.mask_history(scores, [[-1], []])
    with pytest.raises(ValueError, match="history must hold item columns"):  # was an IndexError
        M.full_ranking(lambda u: scores[u], [0, 1], [[1], [2]], [[7], []], (2,))
    with pytest.raises(ValueError, match="history must hold item columns"):  # was named 'exclude indices'
        M.streaming_full_ranking(lambda u: scores[u], torch.eye(5), [0, 1], [[1], [2]], [[7], []], (2,))
    with pytest.raises(ValueError, match="targets must hold item columns"):  # was named 'target'
        M.streaming_full_ranking(lambda u: scores[u], torch.eye(5), [0, 1], [[1], [5]], None, (2,))
    with pytest.raises(ValueError, match="history must have one list per row of scores"):  # rows silently skipped
        M.mask_history(scores, [[1]])
    assert M.mask_history(scores, [[], []]) is not scores  # "a copy", also without history
    with pytest.raises(ValueError, match="K must be a positive int, got 0"):  # was an IndexError
        M.metrics_from_ranks(torch.tensor([[0]]), torch.tensor([[True]]), (0,))
    with pytest.raises(ValueError, match="must have one shape"):  # valid [1, 1] silently broadcast
        M.metrics_from_ranks(torch.tensor([[0, 1]]), torch.tensor([[True]]), (1,))
    with pytest.raises(ValueError, match="K must be a positive int, got 0"):  # no user with targets: unchecked
        M.full_ranking(lambda u: scores[u], [0, 1], [[], []], None, (0,))
    with pytest.raises(ValueError, match=r"table must be a tensor \[num_items, d\]"):  # was an AttributeError
        M.streaming_full_ranking(lambda u: scores[u], [[0.0] * 5], [0], [[1]], None, (2,))
    want = M.rank_metrics(scores, [[1], [2]], (2, 3))  # numpy cut-offs were refused ("K must be a positive int")
    assert M.rank_metrics(scores, [[1], [2]], np.array([2, 3])).keys() == want.keys()
    assert M.full_ranking(lambda u: scores[u], [0, 1], [[1], [2]], None, np.int64(2)).keys() == {
        f"{m}@2" for m in M.METRICS}


# ------------------------------------------------------------------------------------------------
# sampling


@pytest.mark.parametrize(("counts", "match"), [([1, math.nan, 1], "finite and non-negative"),
                                               ([1, -2, 5], "finite and non-negative"),
                                               ([1, 2, 0], "item_counts is 0 for an item of the batch"),
                                               ([0, 0, 0], "item_counts is 0 for an item of the batch")])
def test_in_batch_log_q_validates_the_counts(counts, match):
    """NaN, negative or zero counts gave NaN / −inf corrections (an infinite loss) without a word."""
    with pytest.raises(ValueError, match=match):
        in_batch_log_q(torch.tensor([0, 1, 1, 2]), counts)
    with pytest.raises(ValueError, match="items must be a 1-D int tensor"):  # bool items: an IndexError (a mask)
        in_batch_log_q(torch.tensor([True, False, True]), [1, 2, 1])


def test_popularity_alpha_takes_numpy_scalars_and_refuses_bool():
    s = NegativeSampler(3, "popularity", [1, 2, 4], alpha=np.float32(0.5))  # ValueError before
    torch.testing.assert_close(s.probs, torch.tensor([1.0, 2**0.5, 2.0], dtype=torch.float64) / (3 + 2**0.5))
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        NegativeSampler(3, "popularity", [1, 2, 4], alpha=True)


# ------------------------------------------------------------------------------------------------
# an empty item table, modules


def _empty_table_inputs() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"q": torch.randn(3, 4, generator=g, requires_grad=True), "p": torch.randn(3, 4, generator=g),
            "table": torch.empty(0, 4, requires_grad=True)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["infonce", "bpr", "bce", "mine"])
def test_indexed_layout_over_an_empty_table_follows_the_n_zero_rule(backend, fn):
    """I = 0 with neg_idx entries that are all ignore_index (the only valid ones): IndexError (reference) and
    RuntimeError (torch) instead of the loss of a row without negatives."""
    x = _empty_table_inputs()
    got = getattr(F, fn)(x["q"], x["p"], x["table"], neg_idx=torch.full((3, 2), -100), log_q=torch.empty(0),
                         neg_mask=torch.zeros(3, 2, dtype=torch.bool), reduction="none", backend=backend)
    got.sum().backward()
    q_grad, x["q"].grad = x["q"].grad, None
    want = getattr(F, fn)(x["q"], x["p"], torch.empty(0, 4), reduction="none", backend="reference")
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(q_grad, x["q"].grad)
    assert x["table"].grad is None or x["table"].grad.shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["shared", "per_row", "indexed", "catalogue"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_an_empty_batch_gives_every_input_a_zero_gradient(backend, layout, reduction):
    """R = 0: every input that takes a gradient gets zeros of its shape, as autograd gives through a formula
    with no row. The torch and triton backends returned None for the query, the positives and a tensor τ,
    the reference None for the negatives and the table."""
    tau = torch.tensor(0.5, requires_grad=True)
    q, p = torch.randn(0, 4, requires_grad=True), torch.randn(0, 4, requires_grad=True)
    neg = {"per_row": torch.randn(0, 3, 4)}.get(layout, torch.randn(5, 4)).requires_grad_()
    if layout == "catalogue":
        inputs = [q, neg, tau]
        loss = F.softmax_ce(q, neg, torch.zeros(0, dtype=torch.long), temperature=tau, reduction=reduction,
                            backend=backend)
    else:
        inputs = [q, p, neg, tau]
        kw = {"neg_idx": torch.zeros(0, 3, dtype=torch.long)} if layout == "indexed" else {}
        loss = F.infonce(q, p, neg, temperature=tau, reduction=reduction, backend=backend, **kw)
    grads = torch.autograd.grad(loss.sum(), inputs, allow_unused=True)
    for x, g in zip(inputs, grads):
        assert g is not None and g.shape == x.shape and not g.any()


def test_modules_flatten_empty_negative_dimensions():
    """neg_idx [..., 0] and per-row neg [..., 0, d]: "cannot reshape tensor of 0 elements into [-1, 0]"."""
    q, p = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    got = fastrecloss.InfoNCELoss(reduction="none")(q, p, torch.randn(5, 4), neg_idx=torch.empty(2, 3, 0,
                                                                                                   dtype=torch.long))
    assert got.shape == (2, 3) and torch.equal(got, torch.zeros(2, 3))
    got = fastrecloss.BPRLoss(reduction="none")(q, p, torch.empty(2, 3, 0, 4))
    assert got.shape == (2, 3) and torch.equal(got, torch.zeros(2, 3))


def test_module_hyper_parameter_errors_name_the_class_and_repr_quotes_strings():
    with pytest.raises(ValueError, match="^InfoNCEPlusLoss: lam must be >= 0"):  # said 'infonce_plus: ...'
        fastrecloss.InfoNCEPlusLoss(lam=-1)
    with pytest.raises(ValueError, match="^BPRLoss: neg_reduction must be"):
        fastrecloss.BPRLoss(neg_reduction="max")
    assert "neg_reduction='sum'" in repr(fastrecloss.BCELoss(neg_reduction="sum"))  # was neg_reduction=sum


# ------------------------------------------------------------------------------------------------
# distributed, one process (the multi-rank cases are in tests/test_distributed.py)


def test_sharded_and_ring_errors_name_the_public_function():
    """Errors raised by the inner fused call were prefixed 'sampled_logsumexp:' for every sharded loss."""
    q, table, target = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"^softmax_ce: log_q must have shape \[N\] = \(5,\)"):
        D.softmax_ce(q, table, target, log_q=torch.zeros(4))
    with pytest.raises(ValueError, match="^mine: neg_mask must have shape"):
        D.mine(q, q, table, neg_mask=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="^softmax_ce: temperature must be a finite number > 0"):
        D.softmax_ce(q, table, target, temperature=0.0)
    with pytest.raises(ValueError, match="^temperature must be a finite number > 0"):
        D.ring_logsumexp(q, table, temperature=0.0)
    with pytest.raises(ValueError, match="^backend must be one of"):
        D.ring_logsumexp(q, table, backend="gpu")


# ------------------------------------------------------------------------------------------------
# CLI: one error line, no traceback


@pytest.mark.parametrize("argv", [["train", "contrastvae", "--data", "/nonexistent/seq.txt", "--epochs", "0"],
                                  ["train", "sasrec", "--data", "/", "--epochs", "0"],
                                  ["bench", "--repeats", "0"],
                                  ["bench", "--device", "cuda:7"],
                                  ["bench", "--device", "bogus"],
                                  ["bench", "--out", "/proc/no/such/dir"]])
def test_cli_bad_input_is_one_error_line(argv, capsys):
    """Before: a DataError traceback (train contrastvae/sasrec), every bench case failing one by one with
    "Torch not compiled with CUDA enabled", a FileNotFoundError traceback, a run with zero repeats."""
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastrecloss ") and ": error: " in err[0], err


@pytest.mark.parametrize("argv, prog, unknown", [
    (["train", "mf", "--bogus"], "fastrecloss train mf", "--bogus"),
    (["train", "sasrec", "--epochs", "1", "--bogus", "x"], "fastrecloss train sasrec", "--bogus x"),
    (["bench", "--bogus"], "fastrecloss bench", "--bogus"),
])
def test_cli_unknown_flag_is_reported_by_its_subcommand(argv, prog, unknown, capsys):
    """Before: the top-level usage line and 'fastrecloss: error:', which hides the subcommand's flags."""
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {prog} ") and f"{prog}: error: unrecognized arguments: {unknown}\n" in err, err
