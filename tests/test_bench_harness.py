"""The measurement harness behind ``fastrecloss bench`` and the demo: it must see what is allocated."""

from __future__ import annotations

import sys

import pytest

from fastrecloss import bench_cli
from fastrecloss.benchmark import Case, make_inputs, measure_isolated

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")


def test_peak_memory_sees_the_score_matrix() -> None:
    # The reference holds the 1024 x 8192 fp32 logits (32 MiB) and their gradient; the torch
    # backend's working set is one chunk. The harness must tell them apart by an order of magnitude.
    case = Case("softmax_ce", "catalogue", rows=1024, n=8192)
    ref = measure_isolated(case, "reference", repeats=1)
    ours = measure_isolated(case, "torch", repeats=1)
    assert "error" not in ref and "error" not in ours, (ref, ours)
    logits_mib = 1024 * 8192 * 4 / 2**20
    assert ref["peak_extra_mib"] >= logits_mib
    assert ours["peak_extra_mib"] < logits_mib / 4
    assert ref["time_ms"] > 0 and ours["time_ms"] > 0


def test_isolated_errors_are_reported_not_raised() -> None:
    res = measure_isolated(Case("softmax_ce", "shared", rows=4, n=8), "linear_cross_entropy", repeats=1)
    assert "full-catalogue peer" in res["error"]


@pytest.mark.parametrize("layout", ["shared", "per_row", "indexed", "catalogue"])
def test_input_bytes_counts_the_inputs(layout: str) -> None:
    case = Case("infonce" if layout != "catalogue" else "softmax_ce", layout, rows=6, n=5, dim=4, items=9)
    x = make_inputs(case)
    expected = sum(t.numel() * t.element_size() for t in x.values())
    assert bench_cli.input_bytes(case) == expected
