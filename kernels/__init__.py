"""Triton kernels of fastrecloss (installed as ``fastrecloss.kernels``).

What lives here: the ``@triton.jit`` templates — one per layout (``shared.py``; ``per_row.py``,
which also serves the indexed layout; ``indexed.py``, the deterministic item-segment pass) — the
row math they share (``_rowmath.py``) and the fixed launch heuristics (``config.py``). A kernel
takes tensors, strides and ``tl.constexpr`` flags and knows nothing of autograd or of the rest of
the package: modules here import only the standard library, ``triton`` and ``torch`` (dtypes),
never ``fastrecloss`` outside this folder. ``fastrecloss.backends.triton_plan`` turns a problem
into the arguments of these kernels.
"""
