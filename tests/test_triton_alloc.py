"""The triton backend allocates no R×N score buffer and no R×N×d gathered tensor (SPEC §1, §6).

Every aten op that returns a tensor on fresh storage is recorded while the launcher runs (the
interpreter executes the kernels, so their host-side bookkeeping is recorded too); the backend's
documented outputs are then set aside. What is legitimate is O(R + N) besides the returned
gradients, so at R·N ≥ 8192 (32–64× max(4R, N)) an R×N buffer, or a [block, N] / [R, block] one,
stands out; the sizes still give every kernel several row and column tiles (interpreter tiles:
32×16 shared, 16×64 per-row, 8×64 indexed). A second test plans (without running) the
launches at the issue's sizes on the meta device, where an R×N buffer would have 6.9e10 entries.
"""

from __future__ import annotations

import pytest
import torch
from fastrecloss.kernels import config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastrecloss._problem import Problem, build_problem
from fastrecloss._spec import Kind, LossSpec
from fastrecloss.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.interpreting(),
                                reason="the kernels run on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")


class AllocationRecorder(TorchDispatchMode):
    """Records (op, numel, shape) of every op output whose storage is new."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.allocations: list[tuple[str, int, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.known.add(t.untyped_storage().data_ptr())
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.known:
                    self.known.add(ptr)
                    self.allocations.append((str(func), t.numel(), tuple(t.shape), ptr))
            elif isinstance(t, torch.Tensor):
                self.allocations.append((str(func), t.numel(), tuple(t.shape), -1))
        return out


def _problem(layout: str, R: int, N: int, d: int, I: int, gen: torch.Generator) -> Problem:  # noqa: E741
    q = torch.randn(R, d, generator=gen)
    if layout == "shared":
        return build_problem(q, torch.randn(R, d, generator=gen), torch.randn(N, d, generator=gen),
                             log_q=torch.randn(N, generator=gen), neg_mask=torch.rand(R, N, generator=gen) < 0.1)
    if layout == "per_row":
        return build_problem(q, torch.randn(R, d, generator=gen), torch.randn(R, N, d, generator=gen),
                             log_q=torch.randn(R, N, generator=gen))
    idx = torch.randint(0, I, (R, N), generator=gen)
    return build_problem(q, None, torch.randn(I, d, generator=gen), neg_idx=idx, pos_idx=idx[:, 0].clone(),
                         log_q=torch.randn(I, generator=gen), remove_accidental_hits=True)


SIZES = {"shared": (64, 256, 4, 0), "per_row": (32, 256, 2, 0), "indexed": (32, 256, 4, 100)}


@pytest.mark.parametrize("kind", [Kind.CONTRASTIVE, Kind.BCE], ids=["contrastive", "bce"])
@pytest.mark.parametrize("layout", list(SIZES))
def test_launcher_allocates_no_rxn_buffer(layout: str, kind: Kind, gen: torch.Generator) -> None:
    R, N, d, I = SIZES[layout]  # noqa: E741
    p = _problem(layout, R, N, d, I, gen)
    inputs = [t for t in p.tensors().values() if t is not None]
    row_scale = torch.rand(R, generator=gen)
    with AllocationRecorder(inputs + [row_scale]) as rec:
        outputs = triton_backend.forward_backward(p, LossSpec(kind, eps=1.0), row_scale, (True, True, True))
    returned = {t.untyped_storage().data_ptr() for t in outputs if t is not None}
    scratch = [(op, n, shape) for op, n, shape, ptr in rec.allocations if ptr not in returned]
    assert rec.allocations, "the recorder saw nothing: the test would pass vacuously"
    # a small-R shared rows pass splits its items: fp32 partials [S, 5, R] and [S, R, d] with
    # S·R ≤ SM_COUNT·BLOCK_R (at most one program per SM), a size independent of R and N
    split = [a for a in scratch if len(a[2]) == 3 and a[2][1:] in ((5, R), (R, d))]
    assert all(shape[0] * R <= config.SM_COUNT * 64 for _, _, shape in split), split
    assert bool(split) == (layout == "shared")  # R = 256 rows are 8 fp32 row blocks: split on 132 SMs
    scratch = [a for a in scratch if a not in split]
    biggest = max((n for _, n, _ in scratch), default=0)
    assert biggest < R * N, f"an R×N-sized buffer was allocated: {sorted(scratch, key=lambda a: -a[1])[:3]}"
    # What remains is O(R + N): the [4, R] row statistics and, at most, contiguous copies or int32
    # codes of 1-D inputs.
    assert biggest <= max(4 * R, N), sorted(scratch, key=lambda a: -a[1])[:3]
    if layout == "per_row":  # the only R×N×d tensor is the gradient the contract returns
        assert outputs[3].shape == (R, N, d)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("layout", ["shared", "indexed"])
def test_planned_allocations_at_issue_sizes(layout: str, deterministic: bool) -> None:
    """Plan (no kernel runs) on meta tensors at the issue's sizes: in-batch 16k×16k×64 and full
    catalogue 65k × 1M × 128 (shared), 4096 × 512 negatives from a 10M × 128 table (indexed)."""
    from fastrecloss.backends import triton_plan as launch

    def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    if layout == "shared":
        problems = [Problem("shared", meta(16384, 64), meta(16384, 64), pos_idx=meta(16384, dtype=torch.int64)),
                    Problem("shared", meta(65536, 128), meta(1 << 20, 128), pos_idx=meta(65536, dtype=torch.int64))]
    else:
        problems = [Problem("indexed", meta(4096, 128), meta(10_000_000, 128), neg_idx=meta(4096, 512,
                    dtype=torch.int64), pos_idx=meta(4096, dtype=torch.int64))]
    for p in problems:
        with AllocationRecorder([]) as rec:
            plan = launch.plan(p, LossSpec(Kind.CONTRASTIVE, eps=1.0), meta(p.R, dtype=torch.float32),
                               (True, False, True), deterministic, emulate_dot=False)
        shapes = [shape for _, _, shape, _ in rec.allocations]
        # losses, ∂/∂q, ∂/∂neg, the [4, R] row stats and (shared) the one-float largest row coefficient
        expected = {(p.R,), (p.R, p.d), tuple(p.neg.shape), (4, p.R), (1,)}
        if deterministic and layout == "indexed":  # the int64 sort of the R·N + R item references and the
            # fp32 partial sums of the segments that cross chunks: 2 per chunk of SEGMENT_CHUNK references
            chunks = -(-(p.R * p.N + p.R) // config.SEGMENT_CHUNK)
            expected |= {(p.R * p.N,), (p.R * p.N + p.R,), (2 * chunks, p.d)}
        assert set(shapes) <= expected, set(shapes) - expected
        assert plan.launches
