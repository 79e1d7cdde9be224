"""The shared layout's split-N rows pass (flash-decoding for small R, issue #12 item 3) and its lazy
∂q rescale (item 4).

Oracle tests run the kernels in the interpreter with the number of item splits forced by the plan's
test hook (``splits``) on small shapes, and check that the plan really split (a merge launch);
plan tests run on the meta device at real sizes.
"""

from __future__ import annotations

import pytest
import torch
from fastrecloss.kernels import config
from helpers import (
    CASES,
    FAMILY_CASES,
    LOSS_CASES,
    OPTIONS,
    LossCase,
    case_options,
    check_case,
    make_inputs,
    random_upstream,
    supports,
)

from fastrecloss._problem import Problem, build_problem
from fastrecloss._spec import Kind, LossSpec
from fastrecloss.backends import triton as triton_backend
from fastrecloss.backends import triton_plan

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
interpreted = pytest.mark.skipif(not triton_backend.interpreting(),
                                 reason="the kernels run on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch):
    """Make the triton backend plan with ``splits`` item splits; returns the list of plans it made."""
    plans: list[triton_plan.Plan] = []
    original = triton_plan.plan

    def force(splits: int) -> list[triton_plan.Plan]:
        def planned(*args, **kwargs):
            plans.append(original(*args, **kwargs, splits=splits))
            return plans[-1]

        monkeypatch.setattr(triton_plan, "plan", planned)
        return plans

    return force


def _split_launches(plans: list[triton_plan.Plan]) -> list[int]:
    """S of every split rows pass planned (its grid's second dimension), checking its merge follows."""
    out = []
    for pl in plans:
        names = [s.name for s in pl.launches]
        for i, step in enumerate(pl.launches):
            if step.name == "shared_rows_kernel" and step.args["SPLIT"]:
                merge = pl.launches[i + 1]
                assert names[i + 1] == "shared_rows_kernel:merge" and merge.args["n_splits"] == step.grid[1]
                out.append(step.grid[1])
    return out


def _shape(opts: dict) -> tuple[int, int, int]:
    """R, N, d with several item tiles (in-batch: N = R, so R spans several fp32 item tiles of 16)."""
    return (40, 40, 12) if opts.get("in_batch") else (7, 101, 12)


FP32_COMBOS = [pytest.param(case, name, opts, id=f"{case.id}-{name}")
               for case in LOSS_CASES for name, opts in OPTIONS["shared"].items()
               if supports(case, "shared", opts) and name in ("all", "in_batch_all")
               or case.id == "infonce" and name in ("plain", "mask_col", "pos_idx_hits", "log_q")]


@interpreted
@pytest.mark.cover(("case",), ("name",))
@pytest.mark.parametrize(("case", "name", "opts"), FP32_COMBOS)
def test_split_rows_pass_matches_oracle_fp32(case: LossCase, name: str, opts: dict, forced,
                                             gen: torch.Generator) -> None:
    plans = forced(3)
    R, N, d = _shape(opts)
    check_case(case, "triton", make_inputs("shared", R, N, d, gen=gen, **case_options(case, "shared", opts)), F32)
    assert _split_launches(plans) and all(s == 3 for s in _split_launches(plans))


@interpreted
@pytest.mark.cover(("case",), ("dtype",))
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda c: c.id)
def test_split_rows_pass_matches_oracle_half(case: LossCase, dtype: torch.dtype, forced, gen: torch.Generator) -> None:
    """16-bit tiles are 64 items wide: N = 300 is five tiles, split 2 + 2 + 1."""
    plans = forced(3)
    inputs = make_inputs("shared", 7, 300, 33, gen=gen, **case_options(case, "shared", OPTIONS["shared"]["all"]))
    check_case(case, "triton", inputs, dtype)
    assert set(_split_launches(plans)) == {3}


@interpreted
@pytest.mark.cover(("mask",), ("dtype",))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", [None, "row"], ids=["column-sum", "per-pair"])
def test_split_label_smoothing_and_z_loss(mask: str | None, dtype: torch.dtype, forced, gen: torch.Generator) -> None:
    """Label smoothing's Σ t and Σ v partials (per pair with an [R, N] mask, a column sum without)."""
    plans = forced(4)
    inputs = make_inputs("shared", 7, 400, 20, gen=gen, pos_idx=True, log_q=True, mask=mask, weight=True)
    check_case(CASES["softmax_ce"], "triton", inputs, dtype, label_smoothing=0.15, z_loss=1e-2)
    assert set(_split_launches(plans)) == {4}


@interpreted
@pytest.mark.parametrize("case", [CASES[k] for k in ("bpr", "gbce", "ccl")], ids=lambda c: c.id)
def test_split_neg_reduction_sum(case: LossCase, forced, gen: torch.Generator) -> None:
    plans = forced(3)
    inputs = make_inputs("shared", 7, 101, 12, gen=gen, **case_options(case, "shared", OPTIONS["shared"]["all"]))
    check_case(case, "triton", inputs, F32, neg_reduction="sum")
    assert _split_launches(plans)


@interpreted
@pytest.mark.parametrize("case", [CASES[k] for k in ("infonce", "mine_plus", "bpr", "ccl")], ids=lambda c: c.id)
def test_split_reduction_none_random_upstream(case: LossCase, forced, gen: torch.Generator) -> None:
    plans = forced(3)
    inputs = make_inputs("shared", 9, 101, 8, gen=gen, weight=True, mask="row", log_q=True)
    check_case(case, "triton", inputs, F32, reduction="none", upstream=random_upstream((9,), gen))
    assert _split_launches(plans)


def _stairs(R: int, N: int, d: int, gen: torch.Generator) -> dict:
    """Scores that climb in stairs of one 64-item tile (τ = 0.05): the tile max grows alternately by
    ≈ 20 and ≈ 5 log2 units, so with a threshold of 8 the reference moves on every other tile and
    stays stale on the others (φ up to ≈ 2^5), and a wrong threshold (≥ 25) would leave φ beyond
    fp16's range for the second MMA."""
    inputs = make_inputs("shared", R, N, d, gen=gen, log_q=True, temperature=0.05)
    direction = inputs["query"].mean(0)
    direction = direction / direction.norm()
    inputs["query"] = inputs["query"] * 0.2 + direction
    tile = torch.arange(N) // 64
    level = 0.7 * ((tile + 1) // 2) + 0.175 * (tile // 2)  # +0.7, +0.175, +0.7, … (×1/τ·log2 e: +20, +5)
    jitter = 0.05 * torch.rand(N, generator=gen, dtype=torch.float64)
    inputs["neg"] = inputs["neg"] * 0.05 + (level + jitter)[:, None] * direction
    return inputs


@interpreted
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
def test_lazy_rescale_with_a_climbing_max(splits: int, dtype: torch.dtype, forced, gen: torch.Generator) -> None:
    """|scores| in the hundreds, the max growing across tiles: every gradient against the oracle
    (fp16: φ ≤ 2^LAZY_TH must stay inside fp16 for the MMA operand)."""
    plans = forced(splits)
    n = 200 if dtype == F32 else 400  # 13 / 7 item tiles
    check_case(CASES["infonce"], "triton", _stairs(6, n, 64, gen), dtype, reduction="none",
               upstream=random_upstream((6,), gen))
    assert plans[0].launches[0].args["LAZY_TH"] == (config.LAZY_RESCALE_LOG2 if dtype != F32 else 0.0)
    assert config.LAZY_RESCALE_LOG2 > 0
    assert bool(_split_launches(plans)) == (splits > 1)


def _raw(splits: int, spec: LossSpec) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    inputs = make_inputs("shared", 11, 150, 20, gen=gen, dup=True, hits=True, mask="row", log_q=True, pos_idx=True)
    args = {k: (v.float() if k in ("query", "neg", "log_q") else v) for k, v in inputs.items()}
    p = build_problem(args.pop("query"), None, args.pop("neg"), **args)
    pl = triton_plan.plan(p, spec, torch.rand(p.R, generator=gen), (True, True, True), True, emulate_dot=True,
                          splits=splits)
    assert (len(_split_launches([pl])) == 1) == (splits > 1)
    return [t for t in triton_backend._run(p, pl).outputs() if t is not None]


@interpreted
@pytest.mark.parametrize("spec", [LossSpec(Kind.CONTRASTIVE, eps=0.4, lam=1.1), LossSpec(Kind.BPR)],
                         ids=["infonce_plus", "bpr"])
def test_split_is_bit_identical_run_to_run(spec: LossSpec) -> None:
    """The merge folds the partials in a fixed order without atomics: two runs agree bit for bit,
    and agree with the unsplit pass to fp32 rounding."""
    first, second, unsplit = _raw(4, spec), _raw(4, spec), _raw(1, spec)
    assert len(first) == 3  # loss, ∂/∂query, ∂/∂neg (pos_idx: the positives' gradient is in ∂/∂neg)
    for a, b, c in zip(first, second, unsplit):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


# --- plans (meta device, real sizes) ------------------------------------------------------------


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _catalogue_plan(R: int, N: int, d: int, **kw) -> triton_plan.Plan:
    p = Problem("shared", _meta(R, d), _meta(N, d), pos_idx=_meta(R, dtype=torch.int64))
    spec = LossSpec(Kind.CONTRASTIVE, label_smoothing=0.1)
    return triton_plan.plan(p, spec, _meta(R, dtype=torch.float32), (True, False, True), False, emulate_dot=False,
                            **kw)


def test_small_r_splits_the_items_with_an_o_s_r_d_workspace() -> None:
    R, N, d = 256, 50_000, 64
    pl = _catalogue_plan(R, N, d)
    rows, merge, items = pl.launches
    assert [s.name for s in pl.launches] == ["shared_rows_kernel", "shared_rows_kernel:merge", "shared_items_kernel"]
    blocks, S = rows.grid
    assert blocks == R // rows.config.block_r == 4 and rows.args["SPLIT"]
    n_tiles = -(-N // rows.config.block_n)
    assert S == config.SM_COUNT // blocks == merge.args["n_splits"] == 33  # ⌊132 / 4⌋ ≤ cdiv(782, 8)
    assert rows.args["split_n"] == -(-n_tiles // S) * rows.config.block_n and rows.args["split_n"] * S >= N
    assert merge.grid == (-(-R // merge.config.block_r),)
    ws = [rows.args[k] for k in ("WS", "WS_ACC", "WS_VSUM")]
    assert [tuple(t.shape) for t in ws] == [(S, 5, R), (S, R, d), (S, R, d)]
    assert all(t.dtype == torch.float32 for t in ws)
    assert sum(t.numel() for t in ws) <= S * R * (2 * d + 5) < R * N // 10  # O(S·R·d), never R×N
    assert all(merge.args[k] is rows.args[k] for k in ("WS", "WS_ACC", "WS_VSUM"))
    assert rows.args["COEF_MAX"] is merge.args["COEF_MAX"] is items.args["COEF_MAX"]


def test_split_count_follows_the_sm_count_and_the_items() -> None:
    assert len(_catalogue_plan(256, 50_000, 64, sm_count=8).launches[0].grid) == 2  # 4 row blocks: 2 splits
    assert _catalogue_plan(256, 50_000, 64, sm_count=8).launches[0].grid == (4, 2)
    assert _catalogue_plan(256, 50_000, 64, sm_count=7).launches[0].grid == (4,)  # more than half the SMs busy
    assert _catalogue_plan(256, 64 * config.SPLIT_MIN_TILES, 64).launches[0].grid == (4,)  # too few tiles
    assert _catalogue_plan(256, 64 * config.SPLIT_MIN_TILES + 1, 64).launches[0].grid == (4, 2)
    assert _catalogue_plan(256, 1000, 64, splits=1).launches[0].grid == (4,)  # the test hook
    assert _catalogue_plan(256, 1000, 64, splits=100).launches[0].grid == (4, 16)  # never an empty split


def test_large_r_keeps_one_program_per_row_block() -> None:
    pl = _catalogue_plan(16_384, 50_000, 64)
    assert [s.name for s in pl.launches] == ["shared_rows_kernel", "shared_items_kernel"]
    assert pl.launches[0].grid == (16_384 // 64,) and not pl.launches[0].args["SPLIT"]
    assert pl.launches[0].args["WS"] is None


@pytest.mark.parametrize(("R", "blocks", "splits"), [(256, 4, 33), (1024, 16, 8), (4096, 64, 2), (4480, 70, 1)])
def test_grid_arithmetic_of_the_roofline_note(R: int, blocks: int, splits: int) -> None:
    """docs/roofline.md, small-R section: bf16 d = 64, N = 2^20 items on 132 SMs."""
    pl = _catalogue_plan(R, 1 << 20, 64)
    assert pl.launches[0].grid == ((blocks, splits) if splits > 1 else (blocks,))


def test_forward_only_split_has_no_accumulator_workspace() -> None:
    p = Problem("shared", _meta(64, 32), _meta(10_000, 32), _meta(64, 32))
    pl = triton_plan.plan(p, LossSpec(Kind.BPR), None, (False, False, False), False, emulate_dot=False)
    rows, merge = pl.launches
    assert rows.args["SPLIT"] and rows.args["WS_ACC"] is None and rows.args["LAZY_TH"] == 0.0
    assert merge.name == "shared_rows_kernel:merge"



def test_sass_conditional_blocks_are_the_skippable_body() -> None:
    """The lazy rescale is an ``if`` without ``else``: a predicated forward branch over the FMULs."""
    from fastrecloss.backends import triton_sass as ts

    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FMNMX R2, R3, R4, PT ;
        /*0020*/               @P0 BRA 0x50 ;
        /*0030*/                   FMUL R5, R5, R2 ;
        /*0040*/                   FMUL R6, R6, R2 ;
        /*0050*/                   BSYNC B0 ;
        /*0060*/                   BRA 0x70 ;
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0080*/              @!P1 BRA 0x10 ;
        /*0090*/                   EXIT ;
    """
    loop = ts.steady_loop(ts.parse(text))
    assert [i.addr for i in loop] == list(range(0x10, 0x90, 0x10))
    assert [i.addr for i in ts.conditional_blocks(loop)] == [0x30, 0x40]  # not the unpredicated BRA's 0x60
    assert loop[1].pred == "@P0" and loop[-1].pred == "@!P1" and loop[0].pred == ""


def _far_split_problem() -> Problem:
    """Three rows over 48 items in three fp32 tiles (one per split): items 0–15 score ≈ 0 against
    every row's query direction e₀, items 16–47 score ≈ −c·90 and, unlike the first ones, have
    components along e₁…e₃. Row 0 (c = 1): the far splits' weight 2^{m_s − m} ≈ 2^−130 is
    subnormal, so ∂q_0[1:] is made of flushed terms only; row 1 (c = 0.6, ≈ 2^−78): normal weights
    that must survive; row 2: random."""
    gen = torch.Generator().manual_seed(3)
    neg = torch.zeros(48, 4)
    neg[:16, 0] = 0.1 * torch.randn(16, generator=gen)
    neg[16:, 0] = -90.0 + 0.1 * torch.randn(32, generator=gen)
    neg[16:, 1:] = torch.randn(32, 3, generator=gen)
    query = torch.tensor([[1.0, 0, 0, 0], [0.6, 0, 0, 0], [0, 0, 0, 0]])
    query[2] = 0.5 * torch.randn(4, generator=gen)
    pos = torch.zeros(3, 4)
    pos[:, 0] = 0.5
    pos[2, 1:] = torch.randn(3, generator=gen)
    return build_problem(query, pos, neg)


def _run_far_split(splits: int) -> list[torch.Tensor]:
    p = _far_split_problem()
    pl = triton_plan.plan(p, LossSpec(Kind.CONTRASTIVE, eps=1.0), torch.ones(p.R), (True, True, True), False,
                          emulate_dot=True, splits=splits)
    split = [s for s in pl.launches if s.args.get("SPLIT")]
    assert [s.grid[1] for s in split] == ([splits] if splits > 1 else [])
    assert all(s.args["split_n"] == 16 for s in split)  # split 0 holds exactly the near items
    return [t for t in triton_backend._run(p, pl).outputs() if t is not None]


@interpreted
def test_split_merge_flushes_subnormal_weights_like_the_unsplit_pass() -> None:
    """The hot loops exponentiate with the flush-to-zero ``exp2`` (``ex2.approx.ftz``, modelled in
    the interpreter); the merge must weigh the partials with the same helper, or a split whose max is
    > 126 log2 units below the row's adds subnormal terms that the unsplit pass flushes. Every output
    of the split run agrees with the unsplit one to 1e-5 relative and no absolute slack: the flushed
    ∂q entries are exact zeros in both, the tiny (≈ 2^−78) but normal ones are kept by both."""
    unsplit, split = _run_far_split(1), _run_far_split(3)
    loss, grad_q = unsplit[0], unsplit[1]
    assert torch.equal(grad_q[0, 1:], torch.zeros(3))  # flushed in the unsplit pass (ftz exp2)
    assert (grad_q[1, 1:].abs() > 0).all() and (grad_q[1, 1:].abs() < 1e-20).all()  # kept: normal weights
    assert torch.isfinite(loss).all()
    for got, want in zip(split, unsplit, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
