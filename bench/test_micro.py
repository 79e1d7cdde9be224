"""pytest-benchmark microbenchmarks: ``pytest bench/ --benchmark-only`` (not in the default run).

Forward+backward of every loss family × layout for our backends and the eager reference at a
moderate size; compare groups with ``--benchmark-group-by=param:case``. The full report with
peers, memory and plots is ``fastrecloss bench`` (see README, Performance).
"""

from __future__ import annotations

import pytest
import torch

from fastrecloss.benchmark.harness import Case, implementation, make_inputs

CASES = [
    Case(loss, layout, rows=1024, n=n, items=items)
    for loss in ("infonce", "mine_plus", "bpr", "bce", "ccl")
    for layout, n, items in (("shared", 8192, 0), ("per_row", 64, 0), ("indexed", 256, 50_000))
] + [Case("softmax_ce", "catalogue", rows=2048, n=20_000)]
IMPLS = ["torch", "reference"] + (["triton"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "_"))
def test_fwd_bwd(benchmark, case: Case, impl: str) -> None:
    device = "cuda" if impl == "triton" else "cpu"
    x = make_inputs(case, device)
    fn = implementation(case, impl)
    leaves = [t for t in x.values() if t.requires_grad]

    def step() -> None:
        torch.autograd.grad(fn(x), leaves)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info["case"] = case.label
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
