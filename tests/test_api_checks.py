"""Regression tests for the bugs the independent API check (tests/test_fuzz_api.py, bad-input probes) found:
each failed before its fix. Index dtypes, devices, every row ignored with a learnable weight, the result
dtype of several positives and of the sharded losses, numpy scalars, an empty catalogue."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch import Tensor

from fastrecloss import distributed as D
from fastrecloss import functional as F

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
def test_an_empty_catalogue_with_every_target_ignored(backend: str) -> None:
    """softmax_ce over I = 0 items with every target ignored is 0 (SPEC §5); it used to raise IndexError
    gathering the ignored targets' (replaced) row 0 of an empty table."""
    q = torch.randn(R, DIM, requires_grad=True)
    table = torch.zeros(0, DIM, requires_grad=True)
    loss = F.softmax_ce(q, table, torch.full((R,), -100), backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(q.grad.abs().sum()) == 0.0
