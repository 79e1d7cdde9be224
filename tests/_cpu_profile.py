"""CPU seconds per test, this process plus its children (load-independent, unlike wall time).

Opt-in: ``python3 dev.py test -p tests._cpu_profile`` prints the top tests and the per-file totals at
the end; ``FASTRECLOSS_CPU_TOP=N`` sets how many rows (default 25), ``FASTRECLOSS_CPU_JSON=PATH`` also
writes every test's figures as JSON. A test's time covers its setup, call and teardown, so a
module-scoped fixture is charged to the first test that uses it; collection is reported apart.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict
from collections.abc import Generator

import pytest

_RESULTS: dict[str, dict[str, float]] = {}
_START: dict[str, float] = {}


def _cpu() -> tuple[float, float]:
    """(this process's user+sys CPU, finished children's user+sys CPU), in seconds."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


def pytest_sessionstart(session: pytest.Session) -> None:
    own, children = _cpu()
    _START.update(own=own, children=children, wall=time.perf_counter())


def pytest_collection_finish(session: pytest.Session) -> None:
    own, children = _cpu()
    _START.update(collect=own - _START["own"] + children - _START["children"])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    own0, children0 = _cpu()
    wall0 = time.perf_counter()
    yield
    own1, children1 = _cpu()
    _RESULTS[item.nodeid] = {
        "own": own1 - own0,
        "children": children1 - children0,
        "wall": time.perf_counter() - wall0,
    }


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _RESULTS:
        return
    write = terminalreporter.write_line
    top = int(os.environ.get("FASTRECLOSS_CPU_TOP", "25"))
    cpu = {node: r["own"] + r["children"] for node, r in _RESULTS.items()}
    files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for node, r in _RESULTS.items():
        row = files[node.split("::", 1)[0]]
        row[0] += 1
        row[1] += cpu[node]
        row[2] += r["children"]
    own_end, children_end = _cpu()
    total = own_end - _START["own"] + children_end - _START["children"]
    terminalreporter.section("CPU seconds (process + children)")
    write(f"session {total:.1f} s CPU ({time.perf_counter() - _START['wall']:.0f} s wall), "
          f"collection {_START.get('collect', 0.0):.1f} s, tests {sum(cpu.values()):.1f} s, {len(cpu)} tests")
    write(f"top {top} tests:")
    for node in sorted(cpu, key=cpu.get, reverse=True)[:top]:
        write(f"  {cpu[node]:8.2f}  (children {_RESULTS[node]['children']:6.2f})  {node}")
    write("per file (tests, CPU, of which children):")
    for name, (n, seconds, children) in sorted(files.items(), key=lambda kv: -kv[1][1]):
        write(f"  {seconds:8.2f}  {children:7.2f}  {int(n):5d}  {name}")
    path = os.environ.get("FASTRECLOSS_CPU_JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"session_cpu": total, "collect_cpu": _START.get("collect", 0.0), "tests": _RESULTS}, f, indent=1)
