"""Reference models trained with fastrecloss losses."""

from .contrastvae import ContrastVAE, EncoderConfig
from .mf import MF
from .sasrec import SASRec

__all__ = ["MF", "ContrastVAE", "EncoderConfig", "SASRec"]
