"""The fused Triton kernels against the float64 oracle (SPEC §7, §8), run by the Triton interpreter.

``conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports the kernels, so every test
here executes the real kernel code on CPU tensors. The interpreter is slow, so the grid is
chosen to stay exhaustive where it matters (every loss × layout × option in fp32, every loss
family × layout × option in bf16, every awkward shape for every layout) and representative
elsewhere (shapes cycle through the loss families). The SPEC §8 rule is
``helpers.assert_close_to_oracle`` via ``helpers.check_case``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import (
    CASES,
    DIFF_KEYS,
    FAMILY_CASES,
    LAYOUTS,
    LOSS_CASES,
    OPTIONS,
    LossCase,
    case_options,
    check_case,
    make_inputs,
    random_upstream,
    run_case,
    supports,
)

from fastrecloss._problem import build_problem
from fastrecloss._spec import Kind, LossSpec
from fastrecloss.backends import triton as triton_backend

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TRITON = "triton"

pytestmark = pytest.mark.skipif(not triton_backend.interpreting(),
                                reason="the kernels run on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")


def _combos(cases: list[LossCase], option_names: tuple[str, ...] | None = None) -> list:
    out = []
    for case in cases:
        for layout in LAYOUTS:
            for name, opts in OPTIONS[layout].items():
                if option_names is not None and name not in option_names:
                    continue
                if supports(case, layout, opts):
                    out.append(pytest.param(case, layout, opts, id=f"{case.id}-{layout}-{name}"))
    return out


def _inputs(case: LossCase, layout: str, R: int, N: int, d: int, gen: torch.Generator, **opts) -> dict:
    return make_inputs(layout, R, N, d, gen=gen, **case_options(case, layout, opts))


# --- loss × layout × option --------------------------------------------------------------------


# every loss with every layout, every layout with every option (the torch backend, which shares the row
# math, meets every loss × option pair in the default run; the kernels meet them all in -m exhaustive)
@pytest.mark.cover(("case", "layout"), ("layout", "opts"))
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(LOSS_CASES))
def test_every_loss_layout_option_fp32(case: LossCase, layout: str, opts: dict, gen: torch.Generator) -> None:
    check_case(case, TRITON, _inputs(case, layout, 7, 5, 33, gen, **opts), F32)


@pytest.mark.cover(("case", "layout"), ("layout", "opts"))
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(FAMILY_CASES))
def test_every_family_layout_option_bf16(case: LossCase, layout: str, opts: dict, gen: torch.Generator) -> None:
    check_case(case, TRITON, _inputs(case, layout, 7, 5, 33, gen, **opts), BF16)


# every loss in both 16-bit dtypes, every layout in both (fp32 meets every loss × layout × option pair)
@pytest.mark.cover(("case", "dtype"), ("layout", "dtype"))
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(LOSS_CASES, ("all",)))
def test_every_loss_all_options_half(case: LossCase, layout: str, opts: dict, dtype: torch.dtype,
                                     gen: torch.Generator) -> None:
    check_case(case, TRITON, _inputs(case, layout, 7, 5, 33, gen, **opts), dtype)


@pytest.mark.parametrize(("case", "layout", "opts"), _combos([CASES[k] for k in ("bpr", "gbce", "ccl")], ("all",)))
def test_neg_reduction_sum(case: LossCase, layout: str, opts: dict, gen: torch.Generator) -> None:
    check_case(case, TRITON, _inputs(case, layout, 7, 5, 16, gen, **opts), F32, neg_reduction="sum")


# --- awkward shapes ----------------------------------------------------------------------------

SHAPES = list(itertools.product((1, 7, 129), (0, 1, 5, 101), (1, 33, 64)))


def _cheap(shape: tuple[int, int, int], layout: str) -> bool:
    """The interpreter runs the per-row/indexed kernels one row block after another; with R = 129 and
    N = 101 and a wide d (~15 s each) the shape adds nothing that R = 129, N = 101, d = 1 and
    R = 7, N = 101, d = 64 do not already cover (row tails, item tails, wide rows)."""
    R, N, d = shape
    return layout == "shared" or not (R == 129 and N == 101 and d > 1)


AWKWARD = [(*shape, layout, FAMILY_CASES[i % len(FAMILY_CASES)])
           for i, (shape, layout) in enumerate(itertools.product(SHAPES, LAYOUTS)) if _cheap(shape, layout)]


def _interpreter_cost(p: dict) -> float:
    """Roughly what a case costs in the interpreter: the per-row/indexed kernels walk the rows' items."""
    return 1 + p["R"] * max(p["N"], 1) * p["d"] / (64 if p["layout"] == "shared" else 8)


# every layout with every (R, N) (row and item tails) and every d; every loss family with every layout
@pytest.mark.cover(("layout", "R", "N"), ("layout", "d"), ("case", "layout"), cost=_interpreter_cost)
@pytest.mark.parametrize(("R", "N", "d", "layout", "case"), AWKWARD,
                         ids=[f"R{r}-N{n}-d{d}-{lay}-{c.id}" for r, n, d, lay, c in AWKWARD])
def test_awkward_shapes_fp32(R: int, N: int, d: int, layout: str, case: LossCase, gen: torch.Generator) -> None:
    opts = {"weight": R > 2, "mask": "row" if R > 1 and N > 0 else None, "dup": True}
    check_case(case, TRITON, _inputs(case, layout, R, N, d, gen, **opts), F32)


BF16_SHAPES = [(1, 1, 1), (7, 0, 33), (129, 101, 64), (129, 101, 1), (7, 101, 64)]
BF16_AWKWARD = [pytest.param(case, layout, *shape, id=f"R{shape[0]}-N{shape[1]}-d{shape[2]}-{layout}-{case.id}")
                for case in (CASES["infonce"], CASES["bpr"]) for layout in LAYOUTS for shape in BF16_SHAPES
                if _cheap(shape, layout)]


@pytest.mark.cover(("layout", "R", "N"), ("layout", "d"), ("case", "layout"), cost=_interpreter_cost)
@pytest.mark.parametrize(("case", "layout", "R", "N", "d"), BF16_AWKWARD)
def test_awkward_shapes_bf16(case: LossCase, layout: str, R: int, N: int, d: int, gen: torch.Generator) -> None:
    check_case(case, TRITON, _inputs(case, layout, R, N, d, gen, mask="row" if R > 1 else None), BF16)


def test_softmax_ce_catalogue_larger_than_a_tile(gen: torch.Generator) -> None:
    """softmax_ce over a catalogue of several item tiles, the target's column inside the item pass."""
    inputs = make_inputs("shared", 70, 300, 24, gen=gen, pos_idx=True, log_q=True)
    check_case(CASES["softmax_ce"], TRITON, inputs, F32)


# --- reductions, upstream gradients, requires_grad, ignored rows -------------------------------


@pytest.mark.cover(("case", "dtype"), ("layout", "dtype"))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(LOSS_CASES, ("plain",)))
def test_reduction_none_random_upstream(case: LossCase, layout: str, opts: dict, dtype: torch.dtype,
                                        gen: torch.Generator) -> None:
    inputs = _inputs(case, layout, 9, 6, 8, gen, weight=True, mask="row")
    loss, _ = check_case(case, TRITON, inputs, dtype, reduction="none", upstream=random_upstream((9,), gen))
    assert loss.shape == (9,)


@pytest.mark.cover()
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(FAMILY_CASES, ("plain",)))
def test_reductions_with_weights(case: LossCase, layout: str, opts: dict, reduction: str,
                                 gen: torch.Generator) -> None:
    check_case(case, TRITON, _inputs(case, layout, 9, 6, 8, gen, weight=True, mask="row"), F32, reduction=reduction)


GRAD_COMBOS = [c for n in range(4) for c in itertools.combinations(DIFF_KEYS, n)]


@pytest.mark.cover(("grad_of", "reduction"), ("case", "reduction"))
@pytest.mark.parametrize("grad_of", GRAD_COMBOS, ids=lambda c: "+".join(c) or "nothing")
@pytest.mark.parametrize(("case", "layout", "opts"), [
    pytest.param(CASES["infonce"], "shared", {"pos_idx": True}, id="infonce-shared-pos_idx"),
    pytest.param(CASES["infonce_plus"], "shared", {}, id="infonce_plus-shared"),
    pytest.param(CASES["mine"], "per_row", {}, id="mine-per_row"),
    pytest.param(CASES["bce"], "indexed", {"pos_idx": True}, id="bce-indexed-pos_idx"),
    pytest.param(CASES["bpr"], "indexed", {}, id="bpr-indexed"),
    pytest.param(CASES["ccl"], "per_row", {}, id="ccl-per_row"),
])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_requires_grad_combination(case: LossCase, layout: str, opts: dict, grad_of: tuple[str, ...],
                                         reduction: str, gen: torch.Generator) -> None:
    inputs = _inputs(case, layout, 6, 5, 8, gen, log_q=True, hits=True, **opts)
    grad_of = tuple(k for k in grad_of if k in inputs)
    upstream = random_upstream((6,), gen) if reduction == "none" else None
    _, grads = check_case(case, TRITON, inputs, F32, grad_of=grad_of, reduction=reduction, upstream=upstream)
    assert set(grads) == set(grad_of)


@pytest.mark.cover()
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(FAMILY_CASES, ("plain",)))
def test_all_rows_ignored(case: LossCase, layout: str, opts: dict, reduction: str, gen: torch.Generator) -> None:
    inputs = _inputs(case, layout, 5, 4, 8, gen, log_q=True)
    inputs["weight"] = torch.zeros(5, dtype=torch.float64)
    for dtype in (F32, BF16):
        loss, grads = run_case(case.fn, TRITON, inputs, dtype, hparams=case.hparams, reduction=reduction)
        assert torch.equal(loss, torch.zeros_like(loss)), loss
        for k, g in grads.items():
            assert torch.equal(g, torch.zeros_like(g)), f"grad {k} not zero"


# --- numerics and memory layout ----------------------------------------------------------------


@pytest.mark.cover()
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(FAMILY_CASES, ("plain",)))
def test_large_scores_small_temperature(case: LossCase, layout: str, opts: dict, dtype: torch.dtype,
                                        gen: torch.Generator) -> None:
    """Scores of a few hundred: e^s overflows every float dtype unless the row maximum is subtracted."""
    inputs = _inputs(case, layout, 6, 7, 16, gen, scale=3.0, temperature=0.02, mask="row")
    check_case(case, TRITON, inputs, dtype, reduction="none", upstream=random_upstream((6,), gen))


@pytest.mark.cover(("case",), ("layout", "opts"))
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(FAMILY_CASES, ("all", "in_batch_all")))
def test_noncontiguous_inputs(case: LossCase, layout: str, opts: dict, gen: torch.Generator) -> None:
    check_case(case, TRITON, _inputs(case, layout, 6, 5, 12, gen, **opts), F32, noncontiguous=True)


def test_noncontiguous_side_inputs(gen: torch.Generator) -> None:
    """Transposed [R, N] masks, ids and logQ (per-row) and a strided neg_idx (indexed) are read in place."""
    for layout in ("per_row", "indexed"):
        inputs = make_inputs(layout, 6, 5, 12, gen=gen, mask="row", hits=True, log_q=True)
        for key in ("neg_mask", "neg_ids", "neg_idx") + (("log_q",) if layout == "per_row" else ()):
            if key in inputs:
                inputs[key] = inputs[key].T.contiguous().T
        check_case(CASES["infonce"], TRITON, inputs, F32)


def test_fp64_inputs_are_computed_in_fp32(gen: torch.Generator) -> None:
    """fp64 inputs are accepted (outputs in fp64) and meet the fp32 tolerance of SPEC §8."""
    inputs = make_inputs("shared", 7, 5, 33, gen=gen, log_q=True, hits=True)
    loss, grads = run_case("infonce", TRITON, inputs, torch.float64)
    o_loss, o_grads = run_case("infonce", "reference", inputs, torch.float64)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, o_loss, rtol=1e-5, atol=1e-6)
    for k, g in grads.items():
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, o_grads[k], rtol=1e-5, atol=1e-6)


# --- determinism -------------------------------------------------------------------------------


DET_SPECS = {"infonce_plus": LossSpec(Kind.CONTRASTIVE, eps=0.4, lam=1.1), "bpr": LossSpec(Kind.BPR),
             "ccl": LossSpec(Kind.CCL, margin=0.2, neg_weight=1.5)}


def _raw_outputs(layout: str, spec: LossSpec, deterministic: bool) -> list[torch.Tensor]:
    """forward_backward on fresh, identically seeded inputs with duplicate item references."""
    gen = torch.Generator().manual_seed(5)
    inputs = make_inputs(layout, 12, 7, 20, gen=gen, dup=True, hits=True, mask="row", log_q=True,
                         pos_idx=layout != "per_row", I=5 if layout == "indexed" else None)
    args = {k: (v.float() if k in ("query", "pos", "neg", "log_q") else v) for k, v in inputs.items()}
    p = build_problem(args.pop("query"), args.pop("pos", None), args.pop("neg"), **args)
    row_scale = torch.rand(p.R, generator=gen)
    out = triton_backend.forward_backward(p, spec, row_scale, (True, True, True), deterministic)
    return [t for t in out if t is not None]


@pytest.mark.cover(("layout",), ("spec",))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", list(DET_SPECS.values()), ids=list(DET_SPECS))
def test_deterministic_is_bit_identical(layout: str, spec: LossSpec) -> None:
    """deterministic=True: two runs give bit-identical losses and gradients (colliding scatters included)."""
    first = _raw_outputs(layout, spec, True)
    second = _raw_outputs(layout, spec, True)
    assert len(first) == len(second) >= 3  # loss, ∂/∂query, (∂/∂pos), ∂/∂neg
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_deterministic_plan_has_no_atomics(gen: torch.Generator) -> None:
    """The interpreter runs programs one at a time, so atomics are reproducible there anyway; check
    that the deterministic indexed plan replaces them by the item-segment pass."""
    from fastrecloss.backends import triton_plan as launch

    inputs = make_inputs("indexed", 9, 6, 8, gen=gen, pos_idx=True, dup=True)
    args = {k: (v.float() if k in ("query", "neg") else v) for k, v in inputs.items()}
    p = build_problem(args.pop("query"), None, args.pop("neg"), **args)
    for det in (False, True):
        plan = launch.plan(p, DET_SPECS["bpr"], torch.ones(9), (True, False, True), det, emulate_dot=True)
        names = [s.name for s in plan.launches]
        atomic = [s.name for s in plan.launches
                  if s.args.get("INDEXED") and (s.args["NEED_GN"] or s.args["SCATTER_POS"])]
        # a direct call plans the forward's state pass, then the gradient pass (the only one with ∂/∂v)
        if det:
            assert names == ["rows_kernel", "rows_kernel", "item_segment_kernel", "segment_merge_kernel"]
            assert atomic == []
        else:
            assert names == ["rows_kernel", "rows_kernel"] and atomic == ["rows_kernel"]


@pytest.mark.cover(("case",), ("layout",))
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(FAMILY_CASES, ("all",)))
def test_deterministic_matches_oracle(case: LossCase, layout: str, opts: dict, gen: torch.Generator) -> None:
    check_case(case, TRITON, _inputs(case, layout, 7, 5, 33, gen, **opts), F32, deterministic=True)


# --- errors ------------------------------------------------------------------------------------


def test_cpu_tensors_without_interpreter_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)
    q = torch.randn(3, 4)
    p = build_problem(q, torch.randn(3, 4), torch.randn(5, 4))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_backend.forward_backward(p, LossSpec(Kind.CONTRASTIVE, eps=1.0), None, (False, False, False))


@pytest.mark.parametrize(("layout", "dtype", "d"), [("shared", F32, 128), ("per_row", BF16, 256)])
def test_largest_supported_d(layout: str, dtype: torch.dtype, d: int, gen: torch.Generator) -> None:
    check_case(CASES["infonce"], TRITON, make_inputs(layout, 3, 4, d, gen=gen, log_q=True), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_rows(layout: str, gen: torch.Generator) -> None:
    """R = 0: an empty loss and exactly zero item gradients (nothing is launched)."""
    inputs = make_inputs(layout, 0, 4, 8, gen=gen, log_q=True)
    args = {k: (v.float() if k in ("query", "pos", "neg", "log_q") else v) for k, v in inputs.items()}
    p = build_problem(args.pop("query"), args.pop("pos", None), args.pop("neg"), **args)
    loss, gq, _, gn = triton_backend.forward_backward(p, DET_SPECS["bpr"], torch.ones(0), (True, True, True))
    assert loss.shape == (0,) and gq.shape == (0, 8)
    assert torch.equal(gn, torch.zeros_like(gn))
