"""fastrecloss: fused, memory-lean recommendation losses for PyTorch."""

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
