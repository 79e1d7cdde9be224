"""Reference models trained with fastrecloss losses."""

from .mf import MF

__all__ = ["MF"]
