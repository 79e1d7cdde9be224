#!/usr/bin/env python3
"""Two-command entry point that needs nothing but ``python3``.

    python3 dev.py demo    # set up .venv on first use, run ``fastrecloss demo``
    python3 dev.py test    # set up .venv on first use, run ruff and the test suite
    python3 dev.py integrations  # add fastrecloss[integrations] (RecBole, RePlay), run their tests

Any other arguments after ``demo``/``test`` are passed through (to the demo, or to pytest).
``python3 dev.py run ARGS`` runs ``fastrecloss ARGS`` (train, bench, kernels, ...).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
# The CPU wheel of torch; a bare "torch" requirement would pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"


def _stamp() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "setup.py", "dev.py"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


def _run(cmd: list[str], **kw) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)


def ensure_venv(extra: str | None = None) -> None:
    """The .venv with torch (CPU), fastrecloss and its test extras; ``extra`` adds one more extra on top."""
    _ensure_base()
    if extra is None:
        return
    marker = VENV / f".extra-{extra}-{_stamp()}"
    if marker.exists():
        return
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if _run([*pip, TORCH, "-e", f".[test,bench,{extra}]"]) != 0:  # the torch pin keeps the CPU wheel
        sys.exit(f"could not install fastrecloss[{extra}]")
    for old in VENV.glob(f".extra-{extra}-*"):
        old.unlink()
    marker.touch()


def _ensure_base() -> None:
    marker = VENV / f".installed-{_stamp()}"
    if marker.exists():
        return
    if not PY.exists() and _run([sys.executable, "-m", "venv", VENV]) != 0:
        sys.exit("could not create the virtual environment .venv")
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if _run([*pip, TORCH]) != 0:
        sys.exit(f"could not install {TORCH}")
    if _run([*pip, "-e", ".[test,bench]"]) != 0:
        sys.exit("could not install fastrecloss and its test dependencies")
    for old in VENV.glob(".installed-*"):
        old.unlink()
    marker.touch()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "run", "integrations"}:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    ensure_venv("integrations" if cmd == "integrations" else None)
    env = dict(os.environ)
    if cmd == "integrations":
        env["FASTRECLOSS_INTEGRATIONS"] = "1"  # with CI=true a missing library fails instead of skipping
        files = rest or sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_integrations_*.py"))
        return _run([PY, "-m", "pytest", "-q", "-m", "integrations", *files], env=env)
    if cmd == "demo":
        return _run([PY, "-m", "fastrecloss", "demo", *rest], env=env)
    if cmd == "run":
        return _run([PY, "-m", "fastrecloss", *rest], env=env)
    if _run([PY, "-m", "ruff", "check", "."]) != 0:
        return 1
    return _run([PY, "-m", "pytest", "-q", *rest], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
