"""fastrecloss: fused, memory-lean recommendation losses for PyTorch.

This folder is the public API — ``functional`` (the losses as functions), ``modules`` (an
``nn.Module`` per loss), ``sampling`` (negative samplers with their logQ) and this package's
names — plus the core they share: ``_problem`` (validation into one ``Problem`` per call),
``_spec`` (each loss as a ``LossSpec``) and ``_ops`` (autograd and ``torch.library`` custom-op
binding, which loads a backend on first use). The core imports ``backends`` only lazily, never
``recsys``, ``cli`` or ``benchmark``. Below it: ``backends/`` and ``kernels``
(``fastrecloss.kernels``); above it: ``recsys/`` (reference applications on the public API),
``benchmark/`` and ``cli/``.
"""

from . import functional
from ._problem import set_debug
from ._spec import Kind, LossSpec
from .modules import (
    BCELoss,
    BPRLoss,
    CCLLoss,
    DCLLoss,
    InfoNCELoss,
    InfoNCEPlusLoss,
    MINELoss,
    MINEPlusLoss,
    SoftmaxCELoss,
)

__version__ = "0.1.0"

__all__ = [
    "functional", "set_debug", "Kind", "LossSpec", "InfoNCELoss", "InfoNCEPlusLoss", "DCLLoss", "MINELoss",
    "MINEPlusLoss", "SoftmaxCELoss", "BPRLoss", "BCELoss", "CCLLoss",
]
