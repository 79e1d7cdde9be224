"""Shared by tests/test_integrations_*.py: import a library or skip — but never skip in CI."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch


def require(module: str, extra: str = "integrations") -> ModuleType:
    """Import ``module``; absent → skip with the install command, but fail in CI's integration run."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = (f"{module} is not installed ({exc}); pip install 'fastrecloss[{extra}]' "
                   "or python3 dev.py integrations")
        # CI's integration command (python3 dev.py integrations sets FASTRECLOSS_INTEGRATIONS=1) must not skip;
        # CI's default run collects this module too, before the extra is installed, and deselects it.
        in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
        if in_ci and os.environ.get("FASTRECLOSS_INTEGRATIONS") == "1":
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message, allow_module_level=True)
        raise


def grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out)]


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, params: list[torch.Tensor], *, rtol: float = 1e-5,
                atol: float = 1e-6) -> None:
    """Same loss and same gradient on every parameter (fp32 tolerance of SPEC §8)."""
    torch.testing.assert_close(ours.reshape(()), theirs.reshape(()).to(ours.dtype), rtol=rtol, atol=atol)
    g_ours, g_theirs = grads(ours.reshape(()), params), grads(theirs.reshape(()), params)
    assert any(g.abs().sum() > 0 for g in g_theirs), "the library's loss has no gradient: nothing is compared"
    for p, a, b in zip(params, g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, p=p: f"{tuple(p.shape)}: {m}")
