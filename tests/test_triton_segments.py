"""Issue #12, item 5: the deterministic indexed item gradient in chunks of sorted references.

The references to table rows are cut into chunks of ``SEGMENT_CHUNK`` entries; a popular item's
segment is summed piece by piece by many lanes and merged in chunk order (``kernels/indexed.py``).
The chunk is made small here so that every shape crosses chunk boundaries. Kernels run in the
interpreter (conftest.py); problems are built directly, as CUDA tensors would reach the kernels.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fastrecloss.kernels import config

from fastrecloss._problem import Problem
from fastrecloss._spec import Kind, LossSpec
from fastrecloss.backends import reference, triton_plan
from fastrecloss.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.interpreting(),
                                reason="the kernels run on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")

SPECS = {"infonce_plus": LossSpec(Kind.CONTRASTIVE, eps=0.5, lam=1.1), "bce": LossSpec(Kind.BCE, beta=0.5)}


def _zipf_problem(gen: torch.Generator, R: int = 12, N: int = 9, d: int = 8, I: int = 30,  # noqa: E741
                  hot: float = 0.8) -> Problem:
    """Most references (a fraction ``hot`` of the negatives and half the positives) go to item 3."""
    idx = torch.randint(0, I, (R, N), generator=gen)
    idx = torch.where(torch.rand(R, N, generator=gen) < hot, 3, idx)
    pos_idx = torch.where(torch.rand(R, generator=gen) < 0.5, 3, torch.randint(0, I, (R,), generator=gen))
    return Problem("indexed", torch.randn(R, d, generator=gen), torch.randn(I, d, generator=gen), neg_idx=idx,
                   pos_idx=pos_idx, log_q=-torch.rand(I, generator=gen), neg_mask=torch.rand(R, N, generator=gen) < 0.2,
                   temperature=0.5)


def _table_grad(p: Problem, spec: LossSpec, row_scale: torch.Tensor, deterministic: bool) -> torch.Tensor:
    return triton_backend.forward_backward(p, spec, row_scale, (True, False, True), deterministic)[3]


def _oracle_table_grad(p: Problem, spec: LossSpec, row_scale: torch.Tensor) -> torch.Tensor:
    table = p.neg.double().requires_grad_()
    p64 = dataclasses.replace(p, query=p.query.double(), neg=table, log_q=p.log_q.double())
    (reference.row_losses(p64, spec) * row_scale.double()).sum().backward()
    return table.grad


ZIPF = [("infonce_plus", 3), ("bce", 16), ("infonce_plus", 128)]


@pytest.mark.parametrize(("spec", "chunk"), [(SPECS[k], c) for k, c in ZIPF], ids=[f"{k}-{c}" for k, c in ZIPF])
def test_zipf_hot_item_matches_oracle_and_atomics(spec: LossSpec, chunk: int, gen: torch.Generator,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One item holds ~80 % of the E = R·N + R = 120 references: with CHUNK = 3 its segment is ~30
    pieces merged in order, with 128 a single piece."""
    monkeypatch.setattr(triton_plan, "SEGMENT_CHUNK", chunk)
    p = _zipf_problem(gen)
    assert (torch.cat([p.neg_idx.flatten(), p.pos_idx]) == 3).sum() > 0.6 * p.R * (p.N + 1)
    row_scale = torch.rand(p.R, generator=gen)
    det = _table_grad(p, spec, row_scale, True)
    want = _oracle_table_grad(p, spec, row_scale)
    torch.testing.assert_close(det.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(det, _table_grad(p, spec, row_scale, False), rtol=1e-5, atol=1e-6)


def test_bit_identical_run_to_run_and_across_launch_grids(gen: torch.Generator,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The summation order depends on the sorted references and CHUNK alone: repeated calls and a
    different number of lanes per program (BLOCK_E, i.e. another launch grid) give the same bits."""
    monkeypatch.setattr(triton_plan, "SEGMENT_CHUNK", 5)
    p = _zipf_problem(gen, hot=0.6)
    row_scale = torch.rand(p.R, generator=gen)
    spec = SPECS["infonce_plus"]
    first = _table_grad(p, spec, row_scale, True)
    assert torch.equal(first, _table_grad(p, spec, row_scale, True))
    for lanes in (2, 64):
        monkeypatch.setattr(triton_plan, "segment_config", lambda d, lanes=lanes: config.TileConfig(
            lanes, 1, config.gathered_block_d(d)))
        plan = triton_plan.plan(p, spec, row_scale, (True, False, True), True, emulate_dot=True)
        assert plan.launches[-2].config.block_r == lanes
        assert torch.equal(first, _table_grad(p, spec, row_scale, True)), lanes


@pytest.mark.parametrize("chunk", [2, 7])
def test_chunks_keep_index_safety(chunk: int, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out-of-range and ignore_index entries sort to the ends of the reference list and straddle
    chunk boundaries: they stay masked negatives, never read or written."""
    monkeypatch.setattr(triton_plan, "SEGMENT_CHUNK", chunk)
    p = _zipf_problem(gen, hot=0.5)
    bad = torch.rand(p.R, p.N, generator=gen) < 0.3
    wild = torch.where(torch.rand(p.R, p.N, generator=gen) < 0.5, torch.tensor(-100), torch.tensor(p.neg.shape[0] + 7))
    got_p = dataclasses.replace(p, neg_idx=torch.where(bad, wild, p.neg_idx))
    want_p = dataclasses.replace(p, neg_idx=torch.where(bad, 0, p.neg_idx), neg_mask=p.neg_mask | bad)
    row_scale = torch.rand(p.R, generator=gen)
    spec = SPECS["bce"]
    torch.testing.assert_close(_table_grad(got_p, spec, row_scale, True), _table_grad(want_p, spec, row_scale, True),
                               rtol=1e-5, atol=1e-6)


def test_workspace_is_two_slots_per_chunk() -> None:
    """Planned on the meta device at 4096 × 512 negatives from a 10M × 128 table: the fp32 partial
    sums are [2·⌈E/CHUNK⌉, d] (E = R·N + R references), no R×N×d, no I×d beyond the gradient itself."""
    R, N, d, I = 4096, 512, 128, 10_000_000  # noqa: E741

    def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    p = Problem("indexed", meta(R, d), meta(I, d), neg_idx=meta(R, N, dtype=torch.int64),
                pos_idx=meta(R, dtype=torch.int64))
    plan = triton_plan.plan(p, LossSpec(Kind.CONTRASTIVE), meta(R, dtype=torch.float32), (True, False, True), True,
                            emulate_dot=False)
    pieces, merge = plan.launches[-2:]
    assert (pieces.name, merge.name) == ("item_segment_kernel", "segment_merge_kernel")
    E = R * N + R
    chunks = -(-E // config.SEGMENT_CHUNK)
    assert pieces.args["PARTIAL"] is merge.args["PARTIAL"]
    assert tuple(pieces.args["PARTIAL"].shape) == (2 * chunks, d) and pieces.args["PARTIAL"].dtype == torch.float32
    assert pieces.args["PARTIAL"].numel() * 4 <= 2 * E * d * 4 // config.SEGMENT_CHUNK + 2 * d * 4  # ≈ 16.8 MB here
    assert merge.grid == (-(-chunks // merge.config.block_r),) and pieces.grid == (-(-E // pieces.config.block_r),)
