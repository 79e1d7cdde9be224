"""Property-based tests (hypothesis): random shapes, options and hyper-parameters against the oracle."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from helpers import BACKENDS_UNDER_TEST, LOSS_CASES, LossCase, case_options, check_case, make_inputs, supports
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastrecloss.backends import torch as torch_backend

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw: st.DrawFn) -> tuple[LossCase, str, dict]:
    """A loss, a layout and make_inputs keywords that the loss accepts."""
    case = draw(st.sampled_from(LOSS_CASES))
    layout = draw(st.sampled_from(["shared", "per_row", "indexed"]))
    R, d = draw(st.integers(1, 12)), draw(st.integers(1, 10))
    N = draw(st.integers(0, 9))
    opts = {
        "log_q": draw(st.booleans()), "pos_log_q": draw(st.booleans()), "hits": draw(st.booleans()),
        "weight": draw(st.booleans()), "dup": draw(st.booleans()),
        "mask": draw(st.sampled_from([None, "row"] + (["col"] if layout == "shared" else []))),
        "temperature": draw(st.floats(0.05, 2.0)), "scale": draw(st.sampled_from([0.5, 1.0, 3.0])),
    }
    if layout != "per_row":
        opts["pos_idx"] = draw(st.booleans())
    if layout == "shared":
        opts["in_batch"] = draw(st.booleans()) and opts["mask"] != "col"
        if opts["in_batch"]:
            opts["pos_idx"] = False
    if not case.has_pos:
        opts.update(pos_idx=False, in_batch=False, pos_log_q=False)
    if case.fn == "softmax_ce" or opts.get("pos_idx"):
        N = max(N, 1)  # positives index the table
    if layout == "indexed" and draw(st.booleans()):
        opts["I"] = draw(st.integers(1, 6))  # a small table: many duplicate indices
    if case.fn == "infonce_plus":
        case = LossCase(case.id, case.fn, {"eps": draw(st.floats(0.0, 2.0)), "lam": draw(st.floats(0.0, 2.0))})
    elif case.fn == "ccl":
        case = LossCase(case.id, case.fn, {"margin": draw(st.floats(-1.0, 1.0)),
                                           "neg_weight": draw(st.floats(0.0, 3.0))})
    opts.update(R=R, N=N, d=d)
    return case, layout, opts


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@SETTINGS
@given(problem=problems(), reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**31 - 1),
       neg_sum=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_random_problems_match_oracle(backend: str, problem: tuple, reduction: str, seed: int, neg_sum: bool,
                                      dtype: torch.dtype) -> None:
    case, layout, opts = problem
    assume(supports(case, layout, opts))
    gen = torch.Generator().manual_seed(seed)
    R, N, d = opts.pop("R"), opts.pop("N"), opts.pop("d")
    inputs = make_inputs(layout, R, N, d, gen=gen, **case_options(case, layout, opts))
    upstream = torch.randn(R, generator=gen, dtype=torch.float64) if reduction == "none" else None
    extra = {"neg_reduction": "sum" if neg_sum else "mean"} if case.pointwise else {}
    check_case(case, backend, inputs, dtype, reduction=reduction, upstream=upstream, **extra)


@SETTINGS
@given(problem=problems(), chunk_elements=st.integers(1, 64), tile_elements=st.integers(1, 64),
       seed=st.integers(0, 2**31 - 1))
def test_torch_backend_any_chunk_size(problem: tuple, chunk_elements: int, tile_elements: int, seed: int) -> None:
    case, layout, opts = problem
    assume(supports(case, layout, opts))
    gen = torch.Generator().manual_seed(seed)
    R, N, d = opts.pop("R"), opts.pop("N"), opts.pop("d")
    inputs = make_inputs(layout, R, N, d, gen=gen, **case_options(case, layout, opts))
    with mock.patch.object(torch_backend, "CHUNK_ELEMENTS", chunk_elements), \
            mock.patch.object(torch_backend, "MIN_GEMM_ROWS", 1), \
            mock.patch.object(torch_backend, "TILE_ELEMENTS", tile_elements):
        check_case(case, "torch", inputs, torch.float32, reduction="none",
                   upstream=torch.randn(R, generator=gen, dtype=torch.float64))
