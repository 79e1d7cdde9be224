"""Regression tests for the bugs the independent API check (tests/test_fuzz_api.py, bad-input probes) found:
each failed before its fix. Index dtypes, devices, every row ignored with a learnable weight, the result
dtype of several positives and of the sharded losses, numpy scalars, an empty catalogue."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch import Tensor

import fastrecloss
from fastrecloss import distributed as D
from fastrecloss import functional as F
from fastrecloss import ranking
from fastrecloss.sampling import NegativeSampler, in_batch_log_q

R, N, DIM, I = 5, 4, 6, 9  # noqa: E741 - the item-table size of SPEC §3
BACKENDS = ["reference", "torch"]
META = torch.device("meta")


def _data(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(R, DIM, generator=g), "p": torch.randn(R, DIM, generator=g),
            "neg": torch.randn(N, DIM, generator=g), "table": torch.randn(I, DIM, generator=g),
            "idx": torch.randint(0, I, (R, N), generator=g), "target": torch.randint(0, I, (R,), generator=g)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_integer_indices_index_rows(backend: str, dtype: torch.dtype) -> None:
    """uint8 targets are what F.cross_entropy also takes; torch reads a uint8 index tensor as a bool mask,
    and index_select refuses int16 — both used to fail (IndexError / RuntimeError)."""
    t = _data()
    want = F.softmax_ce(t["q"], t["table"], t["target"], backend=backend)
    torch.testing.assert_close(F.softmax_ce(t["q"], t["table"], t["target"].to(dtype), backend=backend), want)
    torch.testing.assert_close(want, TF.cross_entropy(t["q"] @ t["table"].T, t["target"].to(torch.uint8)))
    want = F.infonce(t["q"], None, t["table"], neg_idx=t["idx"], pos_idx=t["target"], backend=backend)
    got = F.infonce(t["q"], None, t["table"], neg_idx=t["idx"].to(dtype), pos_idx=t["target"].to(dtype),
                    backend=backend)
    torch.testing.assert_close(got, want)
    ids = torch.arange(N)
    want = F.bpr(t["q"], t["p"], t["neg"], remove_accidental_hits=True, pos_ids=t["target"] % N, neg_ids=ids)
    got = F.bpr(t["q"], t["p"], t["neg"], remove_accidental_hits=True, pos_ids=(t["target"] % N).to(dtype),
                neg_ids=ids.to(dtype), backend=backend)
    torch.testing.assert_close(got, want)


def _device_cases(t: dict[str, Tensor]) -> list[tuple[str, object]]:
    m = {k: v.to(META) for k, v in t.items()}
    b = torch.bool
    return [
        ("pos", lambda: F.infonce(t["q"], m["p"], t["neg"])),
        ("neg_idx", lambda: F.infonce(t["q"], t["p"], t["table"], neg_idx=m["idx"])),
        ("target", lambda: F.softmax_ce(t["q"], t["table"], m["target"])),
        ("pos_idx", lambda: F.dcl(t["q"], None, t["table"], neg_idx=t["idx"], pos_idx=m["target"])),
        ("log_q", lambda: F.infonce(t["q"], t["p"], t["neg"], log_q=torch.zeros(N, device=META))),
        ("pos_log_q", lambda: F.bce(t["q"], t["p"], t["neg"], pos_log_q=torch.zeros(R, device=META))),
        ("neg_mask", lambda: F.bpr(t["q"], t["p"], t["neg"], neg_mask=torch.zeros(N, dtype=b, device=META))),
        ("pos_ids", lambda: F.infonce(t["q"], t["p"], t["neg"], remove_accidental_hits=True,
                                      pos_ids=m["target"], neg_ids=torch.arange(N))),
        ("neg_ids", lambda: F.infonce(t["q"], t["p"], t["neg"], remove_accidental_hits=True,
                                      pos_ids=t["target"], neg_ids=torch.arange(N, device=META))),
        ("pos_ids", lambda: F.infonce(t["q"], t["p"], None, in_batch=True, remove_accidental_hits=True,
                                      pos_ids=m["target"])),
        ("weight", lambda: F.ccl(t["q"], t["p"], t["neg"], weight=torch.ones(R, device=META))),
        # the sharded losses (one process)
        ("target", lambda: D.softmax_ce(t["q"], t["table"], m["target"])),
        ("weight", lambda: D.softmax_ce(t["q"], t["table"], t["target"], weight=torch.ones(R, device=META))),
        ("pos", lambda: D.infonce(t["q"], m["p"], t["table"])),
    ]


@pytest.mark.parametrize("case", range(14))
def test_a_tensor_on_another_device_is_a_value_error_naming_it(case: int) -> None:
    """Used to be a RuntimeError from deep inside (or, for a CPU index with CUDA embeddings, a kernel
    reading a host pointer). ``meta`` stands in for the other device on a CPU-only machine."""
    cases = _device_cases(_data())
    assert len(cases) == 14
    name, call = cases[case]
    with pytest.raises(ValueError, match=rf"\b{name} is on meta but query is on cpu|{name} must .* on cpu"):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_row_ignored_gives_zero_gradients_for_the_weight_too(backend: str, reduction: str) -> None:
    """SPEC §5: all rows ignored → loss 0 with zero gradients, never NaN. A learnable weight of zeros used
    to get L_r / tiny (≈ 1e38, or NaN) from the mean's clamped denominator."""
    t = _data()
    w = torch.zeros(R, requires_grad=True)
    q = t["q"].clone().requires_grad_()
    loss = F.infonce(q, t["p"], t["neg"], weight=w, reduction=reduction, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0
    want = torch.zeros(R) if reduction == "mean" else F.infonce(t["q"], t["p"], t["neg"], reduction="none")
    torch.testing.assert_close(w.grad, want.detach())
    torch.testing.assert_close(q.grad, torch.zeros_like(q))
    # a non-zero weight is still differentiated: ∂mean/∂w_r = (L_r − mean) / Σ w
    w = torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0], requires_grad=True)
    F.infonce(t["q"], t["p"], t["neg"], weight=w, backend=backend).backward()
    rows = F.infonce(t["q"], t["p"], t["neg"], reduction="none")
    mean = (rows * w.detach()).sum() / 3.0
    torch.testing.assert_close(w.grad, (rows - mean) / 3.0)


def test_several_positives_return_the_inputs_dtype() -> None:
    """pos_idx [R, P] used to return float32 for bfloat16 inputs (one positive returns bfloat16)."""
    t = _data()
    q, table = t["q"].bfloat16(), t["table"].bfloat16()
    multi = torch.stack([t["target"], (t["target"] + 1) % I], dim=1)
    assert F.infonce(q, None, table, pos_idx=multi).dtype == torch.bfloat16
    assert F.softmax_ce(q, table, multi).dtype == torch.bfloat16
    assert F.infonce(q, None, table.float(), pos_idx=multi).dtype == torch.float32  # mixed: float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.softmax_ce(q, table, multi).dtype == torch.float32  # as F.cross_entropy under autocast


def test_sharded_losses_follow_the_functional_conventions() -> None:
    """One process: uint8 targets, ignore_index=None, the autocast result dtype, bad weights and keywords."""
    t = _data()
    q, table, target = t["q"], t["table"], t["target"]
    torch.testing.assert_close(D.softmax_ce(q, table, target.to(torch.uint8)), F.softmax_ce(q, table, target))
    torch.testing.assert_close(D.softmax_ce(q, table, target, ignore_index=None), F.softmax_ce(q, table, target))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert D.softmax_ce(q.bfloat16(), table.bfloat16(), target).dtype == torch.float32
        assert D.sampled_logsumexp(q.bfloat16(), table.bfloat16()).dtype == torch.float32
    assert D.softmax_ce(q.bfloat16(), table.bfloat16(), target).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        D.softmax_ce(q, table, target, weight=-torch.ones(R))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        D.softmax_ce(q, table, target, ignore_index=1.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        D.softmax_ce(q, table, target, temprature=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_as_hyper_parameters(backend: str) -> None:
    """np.float32 (a config value, a sweep's grid) used to be a TypeError for temperature and a ValueError
    for the loss's own hyper-parameters, while np.float64 (a float subclass) passed."""
    t = _data()
    want = F.infonce_plus(t["q"], t["p"], t["neg"], temperature=0.5, eps=0.25, lam=1.5, backend=backend)
    got = F.infonce_plus(t["q"], t["p"], t["neg"], temperature=np.float32(0.5), eps=np.float32(0.25),
                         lam=np.float32(1.5), backend=backend)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        F.infonce(t["q"], t["p"], t["neg"], temperature=np.float32("nan"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_0dim_arrays_as_hyper_parameters(backend: str) -> None:
    """np.array(0.5) (what np.asarray / a config loader gives) is its Python number for temperature in every
    public entry point and for the losses' own hyper-parameters; it used to be a TypeError / ValueError."""
    t, tau = _data(), np.array(0.5)
    want = F.infonce_plus(t["q"], t["p"], t["neg"], temperature=0.5, eps=0.25, lam=1.5, backend=backend)
    got = F.infonce_plus(t["q"], t["p"], t["neg"], temperature=tau, eps=np.array(0.25), lam=np.array(1.5),
                         backend=backend)
    torch.testing.assert_close(got, want)
    q, table, target = t["q"], t["table"], t["target"]
    for call in (lambda tau: fastrecloss.SoftmaxCELoss(temperature=tau, backend=backend)(q, table, target),
                 lambda tau: fastrecloss.InfoNCELoss(backend=backend)(q, t["p"], t["neg"], temperature=tau),
                 lambda tau: ranking.topk(q, table, 3, temperature=tau, backend=backend)[0],
                 lambda tau: D.softmax_ce(q, table, target, temperature=tau, backend=backend),
                 lambda tau: D.ring_logsumexp(q, table, temperature=tau, backend=backend)):
        torch.testing.assert_close(call(tau), call(0.5))
    for bad in (np.array([0.5]), np.array(True), np.array("0.5")):
        with pytest.raises(TypeError, match="temperature must be a real number.*got ndarray of shape"):
            F.softmax_ce(q, table, target, temperature=bad)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        F.softmax_ce(q, table, target, temperature=np.array(0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_positives_out_of_range_raise_like_one(backend: str) -> None:
    """pos_idx / target [R, P] past the table were silently ignored slots on CPU (one positive raises): a wrong
    id map or catalogue size then trained on fewer positives with no warning."""
    t = _data()
    pos = torch.stack([t["target"], t["target"]], 1)
    pos[1, 1] = I + 2
    with pytest.raises(ValueError, match=rf"infonce: pos_idx has values in \[{I + 2}, {I + 2}\], out of range"):
        F.infonce(t["q"], None, t["table"], pos_idx=pos, backend=backend)
    with pytest.raises(ValueError, match="softmax_ce: target has values .* out of range for table"):
        F.softmax_ce(t["q"], t["table"], pos, backend=backend)
    pos[1, 1] = -100  # the padding of a positive slot stays ignored
    assert torch.isfinite(F.softmax_ce(t["q"], t["table"], pos, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_catalogue_with_every_target_ignored(backend: str) -> None:
    """softmax_ce over I = 0 items with every target ignored is 0 (SPEC §5); it used to raise IndexError
    gathering the ignored targets' (replaced) row 0 of an empty table."""
    q = torch.randn(R, DIM, requires_grad=True)
    table = torch.zeros(0, DIM, requires_grad=True)
    loss = F.softmax_ce(q, table, torch.full((R,), -100), backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(q.grad.abs().sum()) == 0.0



def test_softmax_ce_module_names_target_and_never_takes_the_table_as_per_row() -> None:
    """A single query [d] made the module read the table [I, d] as per-row negatives [..., N, d] (then
    'table must have shape [I, d], got (1, I, d)'); shape errors named ``pos_idx`` instead of ``target``;
    a target [..., P] (several positives, as functional.softmax_ce takes) was refused."""
    t = _data()
    module = fastrecloss.SoftmaxCELoss()
    torch.testing.assert_close(module(t["q"][0], t["table"], t["target"][0]),
                               F.softmax_ce(t["q"][:1], t["table"], t["target"][:1]))
    with pytest.raises(ValueError, match="SoftmaxCELoss: target must have the query's leading shape"):
        module(t["q"], t["table"], t["target"][:2])
    several = torch.stack([t["target"], (t["target"] + 3) % I], dim=1)
    q3 = t["q"].view(1, R, DIM)
    torch.testing.assert_close(module(q3, t["table"], several.view(1, R, 2)), F.softmax_ce(t["q"], t["table"], several))


def test_module_arguments_that_are_not_tensors_are_type_errors() -> None:
    """A list query / pos used to be an AttributeError ('list' object has no attribute 'dim')."""
    t = _data()
    with pytest.raises(TypeError, match="InfoNCELoss: query must be a torch.Tensor"):
        fastrecloss.InfoNCELoss()(t["q"].tolist(), t["p"], t["neg"])
    with pytest.raises(TypeError, match="InfoNCELoss: pos must be a torch.Tensor"):
        fastrecloss.InfoNCELoss()(t["q"], t["p"].tolist(), t["neg"])


def test_in_batch_module_takes_log_q_with_the_positives_leading_shape() -> None:
    """In-batch, log_q has one entry per positive, so a [B, L] query takes log_q [B, L] (it used to be
    refused: 'log_q must have shape [R] ... got (B, L)')."""
    t = _data()
    log_q = -torch.rand(R, generator=torch.Generator().manual_seed(3))
    module = fastrecloss.InfoNCELoss(temperature=0.5)
    got = module(t["q"].view(1, R, DIM), t["p"].view(1, R, DIM), in_batch=True, log_q=log_q.view(1, R))
    torch.testing.assert_close(got, F.infonce(t["q"], t["p"], None, in_batch=True, log_q=log_q, temperature=0.5))



@pytest.mark.parametrize("backend", ["torch"])  # the reference computes in the dtype it is given
def test_several_positives_in_bf16_round_only_the_loss(backend: str) -> None:
    """pos_idx [R, P] in bf16: the loss is −lse(positives) + lse(catalogue), two numbers near 20 at τ = 0.05;
    the catalogue's lse used to come back rounded to bf16 (±0.06) before the difference, so the row loss
    was off by far more than its own bf16 rounding."""
    g = torch.Generator().manual_seed(7)
    q = (torch.randn(64, 16, generator=g) * 0.5).bfloat16()
    table = (torch.randn(40, 16, generator=g) * 0.5).bfloat16()
    several = torch.randint(0, 40, (64, 3), generator=g)
    got = F.softmax_ce(q, table, several, temperature=0.05, reduction="none", backend=backend)
    s = q.double() @ table.double().T / 0.05
    want = -torch.logsumexp(s.gather(1, several), dim=1) + torch.logsumexp(s, dim=1)
    assert got.dtype == torch.bfloat16
    err = (got.double() - want).abs()
    assert bool((err <= want.abs() * 2**-8 + 1e-3).all()), f"max error {float(err.max()):.4f}"



@pytest.mark.parametrize("backend", BACKENDS)
def test_ranking_under_autocast_and_its_hyper_parameters(backend: str) -> None:
    """ranking.topk / target_rank with a bf16 query and an fp32 table (an evaluation under autocast) used to be
    a TypeError; temperature=inf was accepted (every score 0: the ranks of ties); np.int64 k was refused."""
    t = _data()
    q16 = t["q"].bfloat16()
    vals, ids = ranking.topk(q16, t["table"], 3, backend=backend)
    want_vals, want_ids = ranking.topk(q16.float(), t["table"], 3, backend=backend)
    torch.testing.assert_close(vals, want_vals)
    assert ids.tolist() == want_ids.tolist()
    assert (ranking.target_rank(q16, t["table"], t["target"], backend=backend).tolist()
            == ranking.target_rank(q16.float(), t["table"], t["target"], backend=backend).tolist())
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ranking.topk(t["q"], t["table"], 3, temperature=float("inf"), backend=backend)
    assert ranking.topk(t["q"], t["table"], np.int64(3), backend=backend)[1].shape == (R, 3)



def test_sampling_checks_in_batch_items_and_takes_numpy_ints() -> None:
    """in_batch_log_q read item −1 as the last item's count (and raised IndexError past the end); numpy ints
    (a config value) were refused for num_items and n."""
    with pytest.raises(ValueError, match="items has values in \\[-1, 0\\]"):
        in_batch_log_q(torch.tensor([0, -1]), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="out of range for item_counts of size 3"):
        in_batch_log_q(torch.tensor([0, 3]), [1.0, 2.0, 3.0])
    ids, log_q = NegativeSampler(np.int64(10)).sample_shared(np.int64(4))
    assert ids.shape == log_q.shape == (4,)


def test_ring_logsumexp_checks_devices() -> None:
    """pos_ids on another device than the query: a ValueError naming it (one process goes through
    functional's check, which used to miss it; the ring's own check, for several ranks, now has it too)."""
    t = _data()
    with pytest.raises(ValueError, match="pos_ids is on meta but query is on cpu"):
        D.ring_logsumexp(t["q"], t["neg"], ids=torch.arange(N), pos_ids=t["target"].to(META))


# --- found in the kernels (fixed in kernels/shared.py by its owner, 43efc1d) ---------------------


@pytest.mark.skipif(not __import__("fastrecloss.backends.triton", fromlist=["x"]).interpreting(),
                    reason="the kernels run on CPU tensors only under TRITON_INTERPRET=1 (conftest.py)")
@pytest.mark.parametrize("setup", ["in_batch", "hits"])
def test_triton_counts_a_column_mask_with_pair_exclusions(setup: str) -> None:
    """shared_rows_kernel with an [N] neg_mask and pair exclusions (accidental hits, the in-batch diagonal)
    counted n_r as Σ pair_keep, which ignored the column mask: mine (μ log n), the pointwise means (1/n),
    label smoothing (α/n) and the n_r = 0 rule were wrong on backend='triton'."""
    t = _data()
    mask = torch.tensor([True, False, True, False])
    if setup == "in_batch":
        mask = torch.tensor([True, False, True, False, True])
        kw = {"in_batch": True, "neg_mask": mask}
        args = (t["q"], t["p"], None)
    else:
        kw = {"neg_mask": mask, "remove_accidental_hits": True, "pos_ids": t["target"] % N, "neg_ids": torch.arange(N)}
        args = (t["q"], t["p"], t["neg"])
    for fn in ("mine", "bpr"):
        want = getattr(F, fn)(*args, reduction="none", backend="reference", **kw)
        got = getattr(F, fn)(*args, reduction="none", backend="triton", **kw)
        torch.testing.assert_close(got, want)
