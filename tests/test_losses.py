"""Every loss × layout × option against the float64 oracle (SPEC §5, §8), forward and every gradient.

The backends under test come from ``helpers.BACKENDS_UNDER_TEST``; the tests at the end
(gradcheck, chunking) are specific to the chunked torch backend.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import (
    BACKENDS_UNDER_TEST,
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

from fastrecloss import functional as F
from fastrecloss._problem import build_problem
from fastrecloss.backends import torch as torch_backend

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
backends = pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)


def _combos(cases: list[LossCase], options: bool = True) -> list:
    """(case, layout, option name, options) for every supported combination."""
    out = []
    for case in cases:
        for layout in LAYOUTS:
            for name, opts in (OPTIONS[layout].items() if options else [("plain", {})]):
                if supports(case, layout, opts):
                    out.append(pytest.param(case, layout, opts, id=f"{case.id}-{layout}-{name}"))
    return out


def _inputs(case: LossCase, layout: str, R: int, N: int, d: int, gen: torch.Generator, **opts) -> dict:
    return make_inputs(layout, R, N, d, gen=gen, **case_options(case, layout, opts))


# --- the oracle matrix: loss × layout × option × dtype -------------------------------------------


@pytest.mark.cover(("backend", "case", "layout", "opts"), ("case", "dtype"), ("layout", "opts", "dtype"))
@backends
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(LOSS_CASES))
def test_matches_oracle(backend: str, case: LossCase, layout: str, opts: dict, dtype: torch.dtype,
                        gen: torch.Generator) -> None:
    check_case(case, backend, _inputs(case, layout, 7, 5, 33, gen, **opts), dtype)


SHAPES = list(itertools.product((1, 7, 129), (0, 1, 5, 101), (1, 33, 64)))
BF16_SHAPES = [(1, 1, 1), (7, 0, 33), (129, 101, 64)]


# every layout with every shape; every loss with every layout, every R, N and d
@pytest.mark.cover(("backend", "layout", "R", "N", "d"), ("case", "layout"), ("case", "R"), ("case", "N"),
                   ("case", "d"))
@backends
@pytest.mark.parametrize(("R", "N", "d"), SHAPES, ids=[f"R{r}-N{n}-d{d}" for r, n, d in SHAPES])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(LOSS_CASES, options=False))
def test_awkward_shapes(backend: str, case: LossCase, layout: str, opts: dict, R: int, N: int, d: int,
                        gen: torch.Generator) -> None:
    if case.fn == "softmax_ce":
        N += 1  # the catalogue holds the target and N other items
    check_case(case, backend, _inputs(case, layout, R, N, d, gen, weight=R > 2), F32)


@backends
@pytest.mark.parametrize(("R", "N", "d"), BF16_SHAPES, ids=[f"R{r}-N{n}-d{d}" for r, n, d in BF16_SHAPES])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(FAMILY_CASES, options=False))
def test_awkward_shapes_bf16(backend: str, case: LossCase, layout: str, opts: dict, R: int, N: int, d: int,
                             gen: torch.Generator) -> None:
    check_case(case, backend, _inputs(case, layout, R, N, d, gen, mask="row" if R > 1 else None), BF16)


@backends
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(LOSS_CASES, options=False))
def test_reductions_with_weights_and_random_upstream(backend: str, case: LossCase, layout: str, opts: dict,
                                                     reduction: str, gen: torch.Generator) -> None:
    inputs = _inputs(case, layout, 9, 6, 8, gen, weight=True, mask="row")
    upstream = random_upstream((9,), gen) if reduction == "none" else None
    for dtype in (F32, BF16):
        loss, _ = check_case(case, backend, inputs, dtype, reduction=reduction, upstream=upstream)
        assert loss.shape == ((9,) if reduction == "none" else ())


@backends
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos([CASES[k] for k in ("infonce", "mine", "bce")],
                                                             options=False))
def test_weight_gradient(backend: str, case: LossCase, layout: str, opts: dict, reduction: str,
                         gen: torch.Generator) -> None:
    """A weight that requires grad gets ∂loss/∂w (the row losses, and the mean's denominator)."""
    inputs = _inputs(case, layout, 7, 5, 8, gen, weight=True, mask="row")
    upstream = random_upstream((7,), gen) if reduction == "none" else None
    _, grads = check_case(case, backend, inputs, F32, reduction=reduction, upstream=upstream,
                          grad_of=(*DIFF_KEYS, "weight"))
    assert grads["weight"].abs().sum() > 0


@backends
@pytest.mark.parametrize(("case", "layout", "opts"), _combos([CASES[k] for k in ("bpr", "bce", "gbce", "ccl")]))
def test_neg_reduction_sum(backend: str, case: LossCase, layout: str, opts: dict, gen: torch.Generator) -> None:
    check_case(case, backend, _inputs(case, layout, 7, 5, 16, gen, **opts), F32, neg_reduction="sum")


@backends
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(LOSS_CASES, options=False))
def test_large_scores_small_temperature(backend: str, case: LossCase, layout: str, opts: dict,
                                        dtype: torch.dtype, gen: torch.Generator) -> None:
    # Scores of a few hundred (std ≈ 9/τ with τ = 0.02): e^s overflows every float dtype, and the
    # losses still fit fp16; the backend must subtract the row maximum.
    inputs = _inputs(case, layout, 6, 7, 16, gen, scale=3.0, temperature=0.02, mask="row")
    check_case(case, backend, inputs, dtype, reduction="none", upstream=random_upstream((6,), gen))


@pytest.mark.cover(("backend", "case", "layout"), ("layout", "opts", "mode"), ("case", "mode"))
@backends
@pytest.mark.parametrize("mode", ["transposed", "sliced"])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(LOSS_CASES))
def test_noncontiguous_inputs(backend: str, case: LossCase, layout: str, opts: dict, mode: str,
                              gen: torch.Generator) -> None:
    check_case(case, backend, _inputs(case, layout, 6, 5, 12, gen, **opts), F32, noncontiguous=mode)


@backends
@pytest.mark.parametrize("grad_of", [c for n in range(4) for c in itertools.combinations(DIFF_KEYS, n)],
                         ids=lambda c: "+".join(c) or "nothing")
@pytest.mark.parametrize(("case", "layout"), [(CASES["infonce"], lay) for lay in LAYOUTS]
                         + [(CASES["bce"], "indexed"), (CASES["ccl"], "per_row")], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_requires_grad_combinations(backend: str, case: LossCase, layout: str, grad_of: tuple[str, ...],
                                    reduction: str, gen: torch.Generator) -> None:
    inputs = _inputs(case, layout, 6, 5, 8, gen, log_q=True, hits=True)
    loss, grads = check_case(case, backend, inputs, F32, grad_of=grad_of, reduction=reduction)
    assert set(grads) == set(grad_of)
    # The inputs that do not require grad get none, and a loss of constants has no graph.
    args = {k: v.float() if k in DIFF_KEYS else v for k, v in inputs.items()}
    for k in grad_of:
        args[k].requires_grad_()
    out = getattr(F, case.fn)(args["query"], args["pos"], args["neg"], backend=backend, reduction=reduction,
                              **{k: v for k, v in args.items() if k not in DIFF_KEYS})
    assert out.requires_grad == bool(grad_of)
    with torch.no_grad():
        again = getattr(F, case.fn)(args["query"], args["pos"], args["neg"], backend=backend,
                                    reduction=reduction, **{k: v for k, v in args.items() if k not in DIFF_KEYS})
    assert not again.requires_grad
    torch.testing.assert_close(again, out.detach(), rtol=0, atol=0)


# --- behaviour decisions ---------------------------------------------------------------------


@backends
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(LOSS_CASES, options=False))
def test_all_rows_ignored(backend: str, case: LossCase, layout: str, opts: dict, reduction: str,
                          gen: torch.Generator) -> None:
    inputs = _inputs(case, layout, 5, 4, 8, gen, log_q=True)
    inputs["weight"] = torch.zeros(5, dtype=torch.float64)
    for dtype in (F32, BF16):
        loss, grads = run_case(case.fn, backend, inputs, dtype, hparams=case.hparams, reduction=reduction)
        assert torch.equal(loss, torch.zeros_like(loss)), loss
        for k, g in grads.items():
            assert torch.equal(g, torch.zeros_like(g)), f"grad {k} not zero"


@backends
@pytest.mark.parametrize(("case", "layout", "opts"), _combos(LOSS_CASES, options=False))
def test_row_without_negatives(backend: str, case: LossCase, layout: str, opts: dict,
                               gen: torch.Generator) -> None:
    """n_r = 0: contrastive rows give 0 with zero gradient and still count in the mean's
    denominator; pointwise rows keep only their positive term."""
    R = 4
    inputs = _inputs(case, layout, R, 5, 8, gen, mask="row", weight=True)
    inputs["neg_mask"][1:] = False
    inputs["neg_mask"][0] = True  # row 0 has no negative
    inputs["weight"] = torch.tensor([2.0, 1.0, 0.5, 1.5], dtype=torch.float64)
    rows, _ = check_case(case, backend, inputs, F32, reduction="none", grad_of=())
    mean, grads = check_case(case, backend, inputs, F32, reduction="mean")
    torch.testing.assert_close(mean, rows.sum() / 5.0)  # the weights sum to 5, row 0's included
    q, tau = inputs["query"][0].float(), inputs["temperature"]
    pos = inputs["pos"][0] if "pos" in inputs else inputs["neg"][inputs["pos_idx"][0]] if case.has_pos else q * 0
    s_pos = (q * pos.float()).sum() / tau
    expected = {"bpr": 0.0, "bce": case.hparams.get("beta", 1.0) * torch.nn.functional.softplus(-s_pos),
                "ccl": torch.relu(1 - s_pos)}.get(case.fn, 0.0)
    torch.testing.assert_close(rows[0], torch.as_tensor(expected, dtype=F32) * 2.0)
    if not case.pointwise and "query" in grads:
        assert torch.equal(grads["query"][0], torch.zeros_like(grads["query"][0]))


def _missing(inputs: dict) -> dict:
    """build_problem's positional arguments that ``inputs`` lacks."""
    return {k: None for k in ("pos", "neg") if k not in inputs}


@backends
@pytest.mark.parametrize(("case", "layout", "opts"), _combos([CASES[k] for k in ("infonce", "mine", "bce")]))
def test_inputs_never_modified(backend: str, case: LossCase, layout: str, opts: dict,
                               gen: torch.Generator) -> None:
    for dtype in (F32, BF16):
        args = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in _inputs(case, layout, 6, 5, 8, gen, **opts).items()}
        tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
        before = {k: (v.clone(), v._version) for k, v in tensors.items()}
        for k in DIFF_KEYS:
            if k in args:
                args[k].requires_grad_()
        for reduction in ("mean", "none"):
            loss = getattr(F, case.fn)(args["query"], args.get("pos"), args.get("neg"), backend=backend,
                                       reduction=reduction, **{k: v for k, v in args.items() if k not in DIFF_KEYS})
            loss.sum().backward()
        for k, (value, version) in before.items():
            assert tensors[k]._version == version, f"{k} was modified in place"
            assert torch.equal(tensors[k].detach(), value.detach()), f"{k} changed"


@backends
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sampled_logsumexp_defaults(backend: str, layout: str, gen: torch.Generator) -> None:
    inputs = make_inputs(layout, 5, 6, 8, gen=gen, with_pos=False, log_q=True)
    out, _ = run_case("sampled_logsumexp", backend, inputs, F32, reduction=None, grad_of=())
    assert out.shape == (5,)
    p = build_problem(**{k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                         for k, v in inputs.items()}, pos=None, need_pos=False)
    negs = p.neg if layout == "per_row" else (p.neg[p.neg_idx] if layout == "indexed" else p.neg.expand(5, 6, 8))
    log_q = p.log_q[p.neg_idx] if layout == "indexed" else p.log_q
    expected = torch.logsumexp(torch.einsum("rd,rnd->rn", p.query, negs) / p.temperature - log_q, dim=1)
    torch.testing.assert_close(out, expected)


@backends
@pytest.mark.parametrize("case", [CASES[k] for k in ("infonce", "dcl", "bpr")], ids=str)
def test_in_batch_equals_explicit_masking(backend: str, case: LossCase, gen: torch.Generator) -> None:
    """in_batch=True is the shared layout over the positives with the own column masked, and the
    positives' gradient gathers both roles (positive of its row, negative of the others)."""
    R, d = 6, 8
    q = torch.randn(R, d, generator=gen).requires_grad_()
    pos = torch.randn(R, d, generator=gen).requires_grad_()
    fn = getattr(F, case.fn)
    loss = fn(q, pos, None, in_batch=True, backend=backend, temperature=0.3)
    gq, gp = torch.autograd.grad(loss, (q, pos))
    q2, pos2 = q.detach().double().requires_grad_(), pos.detach().double().requires_grad_()
    explicit = fn(q2, pos2, pos2, neg_mask=torch.eye(R, dtype=torch.bool), backend="reference", temperature=0.3)
    eq, ep = torch.autograd.grad(explicit, (q2, pos2))
    torch.testing.assert_close(loss.double(), explicit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gq.double(), eq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp.double(), ep, rtol=1e-5, atol=1e-6)


@backends
@pytest.mark.parametrize("layout", ["shared", "indexed"])
def test_pos_idx_gradient_lands_in_the_table(backend: str, layout: str, gen: torch.Generator) -> None:
    """Positives given as table rows get their gradient in the table, summed with the negatives' part."""
    inputs = make_inputs(layout, 7, 5, 8, gen=gen, pos_idx=True)
    _, grads = check_case(CASES["infonce"], backend, inputs, F32)
    as_vectors = {**inputs, "pos": inputs["neg"][inputs["pos_idx"]]}
    del as_vectors["pos_idx"]
    _, split = run_case("infonce", "reference", as_vectors, torch.float64)
    table_grad = split["neg"].index_add(0, inputs["pos_idx"], split["pos"])
    torch.testing.assert_close(grads["neg"].double(), table_grad, rtol=1e-5, atol=1e-7)


@backends
def test_deterministic_is_bitwise_reproducible(backend: str, gen: torch.Generator) -> None:
    inputs = make_inputs("indexed", 64, 20, 16, gen=gen, dup=True, pos_idx=True, I=8)
    runs = [run_case("infonce", backend, inputs, F32, deterministic=True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k


def test_auto_backend_is_torch_on_cpu(gen: torch.Generator) -> None:
    inputs = make_inputs("shared", 5, 4, 8, gen=gen)
    auto = run_case("infonce", "auto", inputs, F32)
    torch_ = run_case("infonce", "torch", inputs, F32)
    assert torch.equal(auto[0], torch_[0])


# --- torch backend specifics -------------------------------------------------------------------

GRADCHECK_LAYOUTS = [("shared", {}), ("per_row", {}), ("indexed", {}), ("shared", {"pos_idx": True}),
                     ("indexed", {"pos_idx": True}), ("shared", {"in_batch": True})]
GRADCHECK_CASES = [
    pytest.param(case, layout, opts, id=f"{case.id}-{layout}-{'+'.join(opts) or 'vectors'}")
    for case in [*FAMILY_CASES, CASES["infonce_plus"], CASES["softmax_ce"], CASES["sampled_logsumexp"]]
    for layout, opts in GRADCHECK_LAYOUTS if supports(case, layout, opts)
]


@pytest.mark.cover(("case", "layout"), ("case", "reduction"), ("layout", "opts", "reduction"))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(("case", "layout", "opts"), GRADCHECK_CASES)
def test_gradcheck_torch_backend(case: LossCase, layout: str, opts: dict, reduction: str,
                                 gen: torch.Generator) -> None:
    inputs = _inputs(case, layout, 4, 3, 5, gen, log_q=True, hits=True, weight=True, mask="row", dup=True,
                     **opts)
    diff = [k for k in DIFF_KEYS if k in inputs]
    rest = {k: v for k, v in inputs.items() if k not in DIFF_KEYS}
    fn = getattr(F, case.fn)

    def call(*tensors: torch.Tensor) -> torch.Tensor:
        args = dict(zip(diff, tensors))
        if case.fn == "softmax_ce":
            kw = {k: v for k, v in rest.items() if k != "pos_idx"}
            return fn(args["query"], args["neg"], rest["pos_idx"], backend="torch", reduction=reduction, **kw,
                      **case.hparams)
        if case.fn == "sampled_logsumexp":
            return fn(args["query"], args["neg"], backend="torch", reduction=reduction, **rest)
        return fn(args["query"], args.get("pos"), args.get("neg"), backend="torch", reduction=reduction,
                  **rest, **case.hparams)

    tensors = tuple(inputs[k].clone().requires_grad_() for k in diff)
    assert torch.autograd.gradcheck(call, tensors, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("chunk_elements", "tile_elements"), [(1, 1), (15, 4), (30, 1 << 18), (31, 7), (48, 9)])
@pytest.mark.parametrize(("case", "layout", "opts"), _combos([CASES[k] for k in ("infonce", "mine", "ccl", "bpr")],
                                                             options=False))
def test_torch_backend_chunks(case: LossCase, layout: str, opts: dict, chunk_elements: int, tile_elements: int,
                              gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several row chunks (sizes that divide R, leave a remainder, or are 1 row) and several item
    tiles per chunk (shared layout; 1 column, uneven last tile) give the one-chunk result."""
    R, N, d = 12, 5, 3
    inputs = _inputs(case, layout, R, N, d, gen, hits=True, mask="row", log_q=True, weight=True,
                     pos_idx=layout == "indexed")
    whole = run_case(case.fn, "torch", inputs, F32, hparams=case.hparams)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(torch_backend, "MIN_GEMM_ROWS", 1)
    monkeypatch.setattr(torch_backend, "TILE_ELEMENTS", tile_elements)
    p = build_problem(**{k: v for k, v in inputs.items() if k != "weight"}, **_missing(inputs))
    chunk = torch_backend.chunk_rows(p)
    assert chunk < R, "the test must run several chunks"
    tiles = torch_backend.item_tiles(p, chunk)
    assert len(tiles) == (1 if layout != "shared" else math.ceil(N / max(1, tile_elements // chunk)))
    for reduction, upstream in (("mean", None), ("none", random_upstream((R,), gen))):
        check_case(case, "torch", inputs, F32, reduction=reduction, upstream=upstream)
    chunked = run_case(case.fn, "torch", inputs, F32, hparams=case.hparams)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-7)
    for k in whole[1]:
        torch.testing.assert_close(chunked[1][k], whole[1][k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shift", [-300.0, 300.0])
@pytest.mark.parametrize("case", [CASES[k] for k in ("infonce", "infonce_plus", "mine_plus", "bpr")], ids=repr)
def test_torch_backend_tiles_with_a_masked_tile(case: LossCase, shift: float, gen: torch.Generator,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A fully masked item tile (its row max is −inf) must not shift the online log-sum-exp of
    the other tiles, whose scores are all far below or above 0 (e^s over/underflows)."""
    R, N, d = 4, 9, 5
    inputs = _inputs(case, "shared", R, N, d, gen, log_q=True)
    mask = torch.zeros(R, N, dtype=torch.bool)
    mask[:, 3:6] = True  # the middle tile of three
    mask[0, 6:] = True  # row 0 keeps only its first tile
    inputs["neg_mask"] = mask
    inputs["log_q"] = inputs["log_q"] - shift  # scores s − log q ≈ shift
    if inputs.get("pos") is not None:
        inputs["pos"] = inputs["pos"] * 0.1
    monkeypatch.setattr(torch_backend, "MIN_GEMM_ROWS", 1)
    monkeypatch.setattr(torch_backend, "TILE_ELEMENTS", 3 * R)
    p = build_problem(**{k: v for k, v in inputs.items() if k != "weight"}, **_missing(inputs))
    assert torch_backend.item_tiles(p, torch_backend.chunk_rows(p)) == [(0, 3), (3, 6), (6, 9)]
    check_case(case, "torch", inputs, F32, reduction="none", upstream=random_upstream((R,), gen))


def test_chunk_rows_bounds_the_working_set(monkeypatch: pytest.MonkeyPatch, gen: torch.Generator) -> None:
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(torch_backend, "MIN_GEMM_ROWS", 1)
    for layout, per_row in (("shared", 10), ("per_row", 40), ("indexed", 40)):
        inputs = make_inputs(layout, 50, 10, 4, gen=gen)
        p = build_problem(**inputs, **_missing(inputs))
        assert torch_backend.chunk_rows(p) == math.floor(100 / per_row)
    # A large shared catalogue keeps GEMMs of at least MIN_GEMM_ROWS rows (never more than R).
    monkeypatch.setattr(torch_backend, "MIN_GEMM_ROWS", 8)
    inputs = make_inputs("shared", 50, 40, 4, gen=gen)
    assert torch_backend.chunk_rows(build_problem(**inputs, **_missing(inputs))) == 8
    inputs = make_inputs("shared", 5, 40, 4, gen=gen)
    assert torch_backend.chunk_rows(build_problem(**inputs, **_missing(inputs))) == 5
    # ... unless that buffer would exceed MAX_SCORE_ELEMENTS: then fewer rows (at least one).
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 10)
    monkeypatch.setattr(torch_backend, "MAX_SCORE_ELEMENTS", 100)
    inputs = make_inputs("shared", 50, 40, 4, gen=gen)
    assert torch_backend.chunk_rows(build_problem(**inputs, **_missing(inputs))) == 2
    monkeypatch.setattr(torch_backend, "MAX_SCORE_ELEMENTS", 10)
    assert torch_backend.chunk_rows(build_problem(**inputs, **_missing(inputs))) == 1


@pytest.mark.parametrize(("layout", "N", "d"), [("shared", 1024, 4), ("per_row", 64, 16), ("indexed", 64, 16)])
def test_torch_backend_default_chunk_boundary(layout: str, N: int, d: int, gen: torch.Generator) -> None:
    """With the default CHUNK_ELEMENTS, one row more than a full chunk: a full chunk and a 1-row one."""
    per_row = N * (1 if layout == "shared" else d)
    R = torch_backend.CHUNK_ELEMENTS // per_row + 1
    inputs = make_inputs(layout, R, N, d, gen=gen, hits=True, log_q=True)
    p = build_problem(**inputs)
    assert torch_backend.chunk_rows(p) == R - 1
    check_case(CASES["infonce"], "torch", inputs, F32)
