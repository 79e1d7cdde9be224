"""Fused Triton backend (SPEC §6, §7): the launcher behind ``backend="triton"``.

Same contract as :func:`fastrecloss.backends.torch.forward_backward`. The kernels live in
``fastrecloss.kernels`` (one template per layout, shared row math in ``kernels/_rowmath.py``);
this module checks where the tensors are, plans the launches (``fastrecloss/backends/triton_plan.py``) and runs
them. Nothing here synchronises with the host or allocates an R×N or R×N×d buffer.

Precision: the kernels accumulate in fp32 for every input dtype. fp64 inputs are accepted and
computed in fp32 (outputs are returned in fp64, the accumulation dtype of the contract), so
they meet the fp32 tolerance, not fp64 exactness; use ``backend="torch"`` for ``gradcheck``.

CPU tensors run only under the Triton interpreter: set ``TRITON_INTERPRET=1`` before
``fastrecloss.kernels`` is first imported (the kernels are decorated at import time).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .._problem import Problem
from .._spec import LossSpec


def _kernels():
    from . import triton_plan as launch  # imported lazily: decorating the kernels reads TRITON_INTERPRET

    return launch


def interpreting() -> bool:
    """True when the kernels were decorated under ``TRITON_INTERPRET=1`` (they run on CPU tensors)."""
    return type(_kernels().shared_rows_kernel).__name__ == "InterpretedFunction"


def _check_device(p: Problem) -> None:
    check_tensor_device(p.query)


def check_tensor_device(t: Tensor) -> None:
    """CUDA tensors, or CPU tensors under the interpreter; a clear RuntimeError otherwise."""
    dev = t.device
    if dev.type == "cuda" or (dev.type == "cpu" and interpreting()):
        return
    if dev.type == "cpu":
        raise RuntimeError("backend='triton' got CPU tensors: the Triton kernels need CUDA tensors, or the Triton "
                           "interpreter (set TRITON_INTERPRET=1 before importing fastrecloss). Use backend='torch' "
                           "(or 'auto') on CPU.")
    raise RuntimeError(f"backend='triton' needs CUDA tensors, got tensors on {dev}")


def forward_backward(
    p: Problem,
    spec: LossSpec,
    row_scale: Tensor | None,
    needs: tuple[bool, bool, bool],
    deterministic: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Row losses [R] and, when ``row_scale`` [R] is given, the gradients of Σ_r row_scale_r·L_r
    with respect to (query, pos, neg) where ``needs`` asks for them — see
    :func:`fastrecloss.backends.torch.forward_backward`. Outputs are in the accumulation dtype; the
    item gradient of the indexed layout (and the positives' gradient with ``pos_idx``) is an fp32
    table-shaped buffer. ``deterministic`` only changes the indexed layout's item gradient (an
    item-segment pass instead of atomics); every other path is deterministic already.
    """
    _check_device(p)
    plan = _kernels().plan(p, spec, row_scale, needs, deterministic, emulate_dot=interpreting())
    dev = p.query.device
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        for step in plan.launches:
            step.run()
    return plan.outputs()
