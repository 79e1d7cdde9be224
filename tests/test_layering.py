"""The package's layering, read from the source: who may import whom (README, "Layout").

Rooms, bottom to top: ``kernels`` (Triton code: stdlib, triton, torch only) → the core
(``_problem``, ``_spec``, ``_ops``) and ``backends`` → the public API (``functional``,
``modules``, the other public modules, the package itself) → ``recsys`` and ``integrations``
(public API only) → ``benchmark`` → ``cli``. Every import statement counts, lazy ones inside
functions too, and so do ``importlib.import_module("...")`` calls with a literal name.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def module_name(path: Path, root: Path) -> str:
    """Import name of a source file: ``kernels/x.py`` is ``fastrecloss.kernels.x``."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["fastrecloss", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every module a source file imports (absolute names; ``from a import b`` gives ``a.b`` when that
    is a module of the package, else ``a``)."""
    current = module_name(path, root)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, current, is_package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}", root))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def _is_module(name: str, root: Path) -> bool:
    parts = name.split(".")
    if parts[0] != "fastrecloss":
        return False
    base = root / "kernels" if parts[1:2] == ["kernels"] else root / "fastrecloss"
    rest = parts[2:] if parts[1:2] == ["kernels"] else parts[1:]
    target = base.joinpath(*rest)
    return target.with_suffix(".py").exists() or (target / "__init__.py").exists()


PUBLIC_TOP = {"fastrecloss", "fastrecloss.functional", "fastrecloss.modules", "fastrecloss.ranking",
              "fastrecloss.distributed", "fastrecloss.sampling"}
CORE = {"fastrecloss._problem", "fastrecloss._spec", "fastrecloss._ops"}


def room(name: str) -> str:
    parts = name.split(".")
    if parts[0] != "fastrecloss":
        return "external"
    if len(parts) == 1:
        return "public"
    second = parts[1]
    if second == "__main__":  # ``python -m fastrecloss`` is the console command
        return "cli"
    if second in {"kernels", "backends", "recsys", "integrations", "benchmark", "cli"}:
        return second
    if name in CORE or f"fastrecloss.{second}" in CORE:
        return "core"
    return "public"


# room -> rooms of fastrecloss it may import (itself always allowed)
ALLOWED = {
    "kernels": set(),
    "core": {"backends", "kernels"},  # _ops loads a backend lazily
    "backends": {"core", "kernels"},
    "public": {"core", "backends", "kernels"},
    "recsys": {"public"},
    "integrations": {"public"},
    "benchmark": {"public", "core", "backends", "kernels"},
    "cli": {"public", "core", "backends", "kernels", "recsys", "integrations", "benchmark"},
}


def violations(root: Path) -> list[str]:
    out = []
    files = sorted((root / "fastrecloss").rglob("*.py")) + sorted((root / "kernels").rglob("*.py"))
    for path in files:
        name = module_name(path, root)
        own = room(name)
        for imported in sorted(imports_of(path, root)):
            other = room(imported)
            top = imported.split(".")[0]
            if own == "kernels" and other == "external" and top not in STDLIB | {"triton", "torch"}:
                out.append(f"{name} imports {imported}: kernels may import only the stdlib, triton and torch")
            if other in ("external", own):
                continue
            if other not in ALLOWED[own]:
                out.append(f"{name} ({own}) imports {imported} ({other})")
    return out


def test_the_package_respects_its_layers() -> None:
    assert violations(ROOT) == []


def test_kernels_import_nothing_of_the_package_but_themselves() -> None:
    for path in sorted((ROOT / "kernels").glob("*.py")):
        outside = {m for m in imports_of(path, ROOT) if m.startswith("fastrecloss") and
                   not m.startswith("fastrecloss.kernels")}
        assert not outside, f"{path.name} imports {outside}"


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy of the package's sources, checked clean (so a planted import is what the checker reports)."""
    root = tmp_path_factory.mktemp("tree")
    for folder in ("fastrecloss", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            dest = root / path.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(path.read_text())
    assert violations(root) == []
    return root


@pytest.mark.parametrize(("where", "source", "expected"), [
    ("fastrecloss/backends/torch.py", "from ..recsys import metrics\n", "(backends) imports fastrecloss.recsys"),
    ("fastrecloss/backends/torch.py", "def f():\n    import fastrecloss.cli\n", "(backends) imports fastrecloss.cli"),
    ("fastrecloss/recsys/data.py", "from .._problem import Problem\n", "(recsys) imports fastrecloss._problem"),
    ("fastrecloss/functional.py", "import importlib\nimportlib.import_module('fastrecloss.recsys.data')\n",
     "(public) imports fastrecloss.recsys"),
    ("kernels/shared.py", "from fastrecloss._spec import Kind\n", "(kernels) imports fastrecloss._spec"),
    ("kernels/shared.py", "import numpy\n", "kernels may import only"),
])
def test_the_checker_catches_a_planted_violation(tree_copy: Path, where: str, source: str, expected: str) -> None:
    """Plant one bad import in the copy of the tree, and the checker must report it."""
    target = tree_copy / where
    clean = target.read_text()
    target.write_text(clean + "\n" + source)
    try:
        found = violations(tree_copy)
    finally:
        target.write_text(clean)
    assert any(expected in v for v in found), found
