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


def _check_device(p: Problem) -> bool:
    """Raises unless the kernels can run on these tensors; returns whether they run interpreted."""
    return check_tensor_device(p.query)


def check_tensor_device(t: Tensor) -> bool:
    """CUDA tensors, or CPU tensors under the interpreter (then True: they run interpreted); a clear
    RuntimeError otherwise."""
    dev = t.device
    if dev.type == "cuda" or (dev.type == "cpu" and interpreting()):
        return dev.type == "cpu"
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
    return _run(p, _kernels().plan(p, spec, row_scale, needs, deterministic, emulate_dot=_check_device(p),
                                   arch=_arch(p), sm_count=_sm_count(p))).outputs()


def _arch(p: Problem) -> int:
    """The compute capability ×10 of the tensors' GPU (90 in the interpreter: arch-free)."""
    if p.query.device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(p.query.device)
    return 10 * major + minor


def _sm_count(p: Problem) -> int:
    """The SMs of the tensors' GPU (the shared rows pass splits its items below one row block per SM);
    the AOT/interpreter default of ``kernels/config.py`` on CPU."""
    if p.query.device.type != "cuda":
        from ..kernels.config import SM_COUNT

        return SM_COUNT
    return torch.cuda.get_device_properties(p.query.device).multi_processor_count


def forward_state(p: Problem, spec: LossSpec, deterministic: bool = False) -> tuple[Tensor, Tensor]:
    """Row losses [R] and the [4, R] fp32 row stats (shift, coef, g+, label smoothing's uni) that
    determine every gradient, from one pass over the negatives (per-row and indexed layouts)."""
    plan = _run(p, _kernels().plan(p, spec, None, (False, False, False), deterministic,
                                   emulate_dot=_check_device(p), save_state=True))
    return plan.loss, plan.state


def backward_from_state(p: Problem, spec: LossSpec, state: Tensor, row_scale: Tensor, needs: tuple[bool, bool, bool],
                        deterministic: bool = False) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of Σ_r row_scale_r·L_r from the stats :func:`forward_state` saved: one gradient pass
    over the negatives. The per-row layout's ∂neg comes in the input dtype, the others in fp32."""
    plan = _run(p, _kernels().plan(p, spec, row_scale, needs, deterministic, emulate_dot=_check_device(p),
                                   state=state))
    return plan.grad_q, plan.grad_p, plan.grad_neg


def _run(p: Problem, plan):
    dev = p.query.device
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        for step in plan.launches:
            step.run()
    return plan
