"""Losses beyond one device, on torch.distributed (SPEC §4, ``fastrecloss.distributed``).

Two modes:

* **cross-rank negatives** — :func:`gather_negatives`: every rank's negatives (in-batch
  positives or a sampled pool) gathered into one pool with gradients back to their owners; each
  rank then calls the ordinary :mod:`fastrecloss.functional` loss on its own rows;
  :func:`ring_logsumexp` is the ring variant that never holds the global pool (Inf-CL).
* **a sharded catalogue** — :func:`softmax_ce`, :func:`sampled_logsumexp` and the contrastive
  family (:func:`infonce`, :func:`infonce_plus`, :func:`dcl`, :func:`mine`, :func:`mine_plus`)
  with ``neg`` = this rank's rows of the table or pool: per-row statistics merged with
  all-reduce, the same loss on every rank, ∂query complete everywhere, ∂shard local.

Every call exchanges its configuration first (one small all-gather), so a bad one — shards that
overlap or leave a gap, ``d`` differing across ranks, a target outside every shard, a bad
argument on one rank — raises the same error on every rank instead of hanging a collective.
Without an initialised process group everything runs as one process. See docs/distributed.md.
"""

from .gather import gather_negatives
from .losses import dcl, infonce, infonce_plus, mine, mine_plus, sampled_logsumexp, softmax_ce
from .ring import ring_logsumexp

__all__ = ["gather_negatives", "ring_logsumexp", "softmax_ce", "sampled_logsumexp", "infonce", "infonce_plus",
           "dcl", "mine", "mine_plus"]
