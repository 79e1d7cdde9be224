"""The measurement harness behind ``fastrecloss bench`` and the demo: it must see what is allocated."""

from __future__ import annotations

import sys

import pytest

from fastrecloss.benchmark import suites as bench_cli
from fastrecloss.benchmark.harness import Case, implementation, make_inputs, measure_isolated

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")


def test_peak_memory_sees_the_score_matrix() -> None:
    # The reference holds the 4096 x 8192 fp32 logits (128 MiB) and their gradient; the torch
    # backend's working set is one chunk (256 rows). The harness must tell them apart. One warm-up
    # and the measured call (repeats=0), one thread each (``threads``, as the demo and bench pin it).
    case = Case("softmax_ce", "catalogue", rows=4096, n=8192)
    ref = measure_isolated(case, "reference", repeats=0, threads=1)
    ours = measure_isolated(case, "torch", repeats=0, threads=1)
    assert "error" not in ref and "error" not in ours, (ref, ours)
    assert ref["threads"] == ours["threads"] == 1
    logits_mib = 4096 * 8192 * 4 / 2**20
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


PEER_CASES = [Case(loss, layout, rows=12, n=40, dim=8, items=30) for loss, layout in
              [("softmax_ce", "catalogue"), ("infonce", "shared"), ("infonce", "per_row"), ("infonce", "indexed")]]
PEERS = [pytest.param(case, impl, id=f"{case.loss}-{case.layout}-{impl}")
         for case in PEER_CASES for impl in ("torch", *bench_cli.peers(case)) if impl != "reference"]
COMPILED = ("compiled_reference", "cce")  # torch.compile: seconds per case on a cold inductor cache


def test_the_catalogue_peers_include_linear_cross_entropy() -> None:
    assert "linear_cross_entropy" in bench_cli.peers(PEER_CASES[0])
    assert all("linear_cross_entropy" not in bench_cli.peers(c) for c in PEER_CASES[1:])


# every case and every peer (each compiled peer once); the other pairs are -m exhaustive
@pytest.mark.cover(("case",), ("impl",), cost=lambda p: 20 if p["impl"] in COMPILED else 1)
@pytest.mark.parametrize(("case", "impl"), PEERS)
def test_every_peer_computes_the_same_loss(case: Case, impl: str) -> None:
    """A timing comparison is only fair if every peer computes our loss (and its gradients)."""
    import torch

    x = make_inputs(case)
    leaves = [t for t in x.values() if t.requires_grad]
    want = implementation(case, "reference")(x)
    want_grads = torch.autograd.grad(want, leaves)
    got = implementation(case, impl)(x)
    torch.testing.assert_close(got, want, msg=impl)
    for g, w in zip(torch.autograd.grad(got, leaves), want_grads):
        torch.testing.assert_close(g, w, msg=impl)
