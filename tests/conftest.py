"""Test configuration: the Triton kernels run under the interpreter on CPU tensors, and torch runs
single-threaded (the tests use small tensors; intra-op threads on a shared 2-core machine made
the loss suite ~8x slower: 78 s vs 9.5 s for test_matches_oracle under load). Set
FASTRECLOSS_TEST_THREADS to change the thread count.

``@pytest.mark.cover(...)`` on a parametrized test keeps a covering subset of its cases in the default
run and marks the others ``exhaustive`` (CI runs them as a step of their own: ``-m exhaustive``). Each
argument names parameters, alone or as a tuple: every value combination of those parameters that
occurs among the test's cases is run by at least one default case (no arguments: every pair of
parameters). ``cost=f`` (f: the case's parameters -> a relative cost) makes the greedy choice prefer the
cases that cover the most per unit of cost; ties go to the first case, so the split is the same run to run.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from collections.abc import Callable

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FASTRECLOSS_TEST_THREADS", "1")))


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator, fresh per test, so every test sees the same inputs run to run."""
    return torch.Generator().manual_seed(1234)


def _key(value: object) -> object:
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def covering(cases: list[dict[str, object]], factors: list[tuple[str, ...]],
             cost: Callable[[dict[str, object]], float] | None = None) -> list[int]:
    """Indices of a subset of ``cases`` (parameter dicts) in which every value combination of each
    factor (a tuple of parameter names) that occurs in ``cases`` occurs at least once (greedy set cover,
    weighted by ``cost``)."""
    needs = [{(f, tuple(_key(case[n]) for n in f)) for f in factors} for case in cases]
    costs = [cost(case) if cost else 1.0 for case in cases]
    missing = set().union(*needs)
    chosen: list[int] = []
    while missing:
        best = max(range(len(cases)), key=lambda i: (len(needs[i] & missing) / costs[i], -i))
        chosen.append(best)
        missing -= needs[best]
    return sorted(chosen)


@pytest.hookimpl(tryfirst=True)  # before -m deselects (the mark plugin's hook)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups: dict[tuple[str, str], list[pytest.Item]] = defaultdict(list)
    for item in items:
        if item.get_closest_marker("cover") is not None and hasattr(item, "callspec"):
            groups[(item.path, item.originalname)].append(item)
    for group in groups.values():
        params = [item.callspec.params for item in group]
        marker = group[0].get_closest_marker("cover")
        args = marker.args
        names = sorted(params[0])
        factors = ([(a,) if isinstance(a, str) else tuple(a) for a in args] if args
                   else list(itertools.combinations(names, 2)) or [tuple(names)])
        unknown = {n for f in factors for n in f} - set(names)
        if unknown:
            raise pytest.UsageError(f"{group[0].nodeid}: cover() names {sorted(unknown)}, not parameters {names}")
        keep = set(covering(params, factors, marker.kwargs.get("cost")))
        for i, item in enumerate(group):
            if i not in keep:
                item.add_marker(pytest.mark.exhaustive)
