"""The cover() marker of conftest.py: the default cases cover every combination they claim to."""

from __future__ import annotations

import itertools

import pytest
from conftest import covering

GRID = [{"loss": loss, "layout": layout, "dtype": dtype}
        for loss, layout, dtype in itertools.product("abcde", ("shared", "per_row", "indexed"), ("fp32", "bf16"))]


@pytest.mark.parametrize("factors", [[("loss",), ("layout",)], [("loss", "layout"), ("layout", "dtype")],
                                     list(itertools.combinations(("loss", "layout", "dtype"), 2))], ids=str)
def test_covering_holds_every_combination_of_every_factor(factors: list[tuple[str, ...]]) -> None:
    keep = covering(GRID, factors)
    assert keep == sorted(set(keep)) and len(keep) < len(GRID)
    for f in factors:
        want = {tuple(c[n] for n in f) for c in GRID}
        assert {tuple(GRID[i][n] for n in f) for i in keep} == want, f


def test_cost_steers_the_choice_to_cheap_cases() -> None:
    keep = covering(GRID, [("loss",)], cost=lambda c: 1 if c["dtype"] == "bf16" else 10)
    assert len(keep) == 5 and all(GRID[i]["dtype"] == "bf16" for i in keep)

