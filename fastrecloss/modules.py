"""``nn.Module`` wrappers: hold the hyper-parameters, accept queries of any leading shape.

A query of shape [..., d] is flattened to R rows; every per-row argument (``pos`` [..., d],
``pos_idx``/``pos_log_q``/``pos_ids``/``weight`` [...] (``pos_idx`` / a target [..., P]: several
positives), per-row ``neg`` [..., N, d], ``neg_idx`` [..., N], per-row ``log_q``/``neg_mask``/``neg_ids``
[..., N], and with ``in_batch=True`` ``log_q``/``neg_mask`` [...] (one per in-batch item)) is flattened
the same way.
``padding_mask`` [...] (True = padding) gives the padded rows weight 0; with ``reduction='none'``
the result has the query's leading shape.
``temperature`` is a float, an ``nn.Parameter`` (registered: learned with the model) or a constant tensor
(a buffer); ``temperature=`` in a call overrides it (CLIP's ``1 / logit_scale.exp()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as F
from ._problem import (
    BACKENDS,
    IGNORE_INDEX,
    REDUCTIONS,
    check_choice,
    check_flag,
    check_ignore_index,
    check_temperature,
)

_ROW_ARGS = ("pos_idx", "pos_log_q", "pos_ids", "weight")


class _RecLoss(nn.Module):
    """Common machinery; subclasses name their loss (``loss``) and pass their hyper-parameters.

    Every keyword is checked at construction: an unknown one is a ``TypeError`` (Python's own,
    the signatures are explicit), a bad value a ``ValueError``/``TypeError`` naming the class."""

    loss: str

    def __init__(self, *, temperature: float | Tensor = 1.0, reduction: str = "mean", backend: str = "auto",
                 remove_accidental_hits: bool = False, deterministic: bool = False,
                 ignore_index: int | None = IGNORE_INDEX) -> None:
        super().__init__()
        with F._named(type(self).__name__):
            check_choice("reduction", reduction, REDUCTIONS)
            check_choice("backend", backend, BACKENDS)
            self._set_temperature(check_temperature(temperature))
            check_flag("remove_accidental_hits", remove_accidental_hits)
            check_flag("deterministic", deterministic)
            check_ignore_index(ignore_index)
        self.reduction = reduction
        self.backend = backend
        self.remove_accidental_hits = remove_accidental_hits
        self.deterministic = deterministic
        self.ignore_index = ignore_index
        self.hparams: dict[str, Any] = {}

    def _set_temperature(self, tau: float | Tensor) -> None:
        """A float stays an attribute; an ``nn.Parameter`` is registered (``.parameters()``, ``.to()``,
        ``state_dict``); another tensor is a non-persistent buffer (``.to()`` moves it)."""
        if isinstance(tau, nn.Parameter) or not isinstance(tau, Tensor):
            self.temperature = tau
        elif tau.requires_grad:
            raise TypeError("temperature: a tensor that requires grad must be an nn.Parameter to be held by the "
                            "module (or pass a computed τ per call: loss(..., temperature=tau))")
        else:
            self.register_buffer("temperature", tau, persistent=False)

    def _set_hparams(self, **hparams: Any) -> None:
        """Hold (and validate now, not at the first forward) the loss's own hyper-parameters."""
        F.loss_spec(self.loss, type(self).__name__, **hparams)
        self.hparams = hparams

    @property
    def fn(self) -> Callable[..., Tensor]:
        return getattr(F, self.loss)

    def extra_repr(self) -> str:
        extras = "".join(f", {k}={v!r}" for k, v in self.hparams.items())
        tau = self.temperature
        if isinstance(tau, Tensor):  # its value (a host read: repr is no hot path)
            tau = f"{float(tau.detach()):g} ({'learnable' if tau.requires_grad else 'tensor'})"
        return f"temperature={tau}, reduction={self.reduction!r}, backend={self.backend!r}{extras}"

    # Public names of the flattened arguments where the module's signature differs (SoftmaxCELoss).
    _names: dict[str, str] = {}
    _table_only = False  # neg is always an item table [I, d] (never per-row [..., N, d])

    def _call(self, query: Tensor, pos: Tensor | None, neg: Tensor | None, padding_mask: Tensor | None,
              kwargs: dict[str, Any]) -> Tensor:
        with F._named(type(self).__name__):
            if not isinstance(query, Tensor):
                raise TypeError(f"query must be a torch.Tensor of shape [..., d], got {type(query).__name__}")
            if query.dim() < 1:
                raise ValueError(f"query must have shape [..., d], got {tuple(query.shape)}")
            q, pos, neg, kwargs = self._flatten(query, pos, neg, padding_mask, kwargs)
        temperature = kwargs.pop("temperature", self.temperature)  # a per-call τ (e.g. 1 / logit_scale.exp())
        out = self._fn(q, pos, neg, temperature=temperature, reduction=self.reduction, backend=self.backend,
                       remove_accidental_hits=self.remove_accidental_hits, deterministic=self.deterministic,
                       ignore_index=self.ignore_index, **self.hparams, **kwargs)
        return out.reshape(query.shape[:-1]) if self.reduction == "none" else out

    def _flatten(self, query: Tensor, pos: Tensor | None, neg: Tensor | None, padding_mask: Tensor | None,
                 kwargs: dict[str, Any]) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, Any]]:
        """query [..., d] → [R, d] and every per-row argument flattened the same way (see the module doc)."""
        lead = tuple(query.shape[:-1])
        k = len(lead)
        n_rows = math.prod(lead)  # not -1: a reshape of 0 elements to [-1, 0] is ambiguous (d = 0 or N = 0)

        def rows(name: str, t: Tensor | None, extra: int) -> Tensor | None:
            if t is None:
                return None
            public = self._names.get(name, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"{public} must be a torch.Tensor with the query's leading shape {lead}, got "
                                f"{type(t).__name__}")
            if tuple(t.shape[:k]) != lead or t.dim() != k + extra:
                raise ValueError(f"{public} must have the query's leading shape {lead} followed by {extra} more "
                                 f"dimension(s), got {tuple(t.shape)}")
            return t.reshape(n_rows, *t.shape[k:])

        in_batch = bool(kwargs.get("in_batch"))
        per_row_neg = (not self._table_only and isinstance(neg, Tensor) and kwargs.get("neg_idx") is None
                       and neg.dim() == k + 2)
        q = query.reshape(n_rows, query.shape[-1])
        pos = rows("pos", pos, 1)
        if per_row_neg:
            neg = rows("neg", neg, 2)
        for name in _ROW_ARGS:
            t = kwargs.get(name)
            several = name == "pos_idx" and isinstance(t, Tensor) and t.dim() == k + 1  # several positives [..., P]
            kwargs[name] = rows(name, t, 1 if several else 0)
        kwargs["neg_idx"] = rows("neg_idx", kwargs.get("neg_idx"), 1)
        for name in ("log_q", "neg_mask", "neg_ids"):
            t = kwargs.get(name)
            if in_batch and name != "neg_ids" and isinstance(t, Tensor) and t.dim() == k:
                kwargs[name] = rows(name, t, 0)  # one per in-batch item: the positives' leading shape
            elif isinstance(t, Tensor) and t.dim() == k + 1 and (per_row_neg or name != "log_q"):
                kwargs[name] = rows(name, t, 1)
        if padding_mask is not None:
            if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
                got = padding_mask.dtype if isinstance(padding_mask, Tensor) else type(padding_mask).__name__
                raise TypeError(f"padding_mask must be a bool tensor (True = padding) of shape {lead}, got {got}")
            pad = rows("padding_mask", padding_mask, 0)
            keep = (~pad).to(q.dtype)
            kwargs["weight"] = keep if kwargs["weight"] is None else kwargs["weight"] * keep
            if in_batch:  # a padded row's positive is no negative of the other rows either
                mask = kwargs.get("neg_mask")
                kwargs["neg_mask"] = pad if mask is None else mask | (pad if mask.dim() == 1 else pad[None, :])
        return q, pos, neg, kwargs

    def forward(self, query: Tensor, pos: Tensor | None = None, neg: Tensor | None = None, *,
                padding_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """query [..., d]; pos [..., d] (or ``pos_idx=``); neg [N, d] | [..., N, d] | table [I, d] with
        ``neg_idx=`` [..., N]; any other keyword of :mod:`fastrecloss.functional`."""
        return self._call(query, pos, neg, padding_mask, dict(kwargs))

    def _fn(self, query: Tensor, pos: Tensor | None, neg: Tensor | None, **kw: Any) -> Tensor:
        return self.fn(query, pos, neg, **kw)


class InfoNCELoss(_RecLoss):
    """InfoNCE / sampled softmax (pass ``log_q`` for the logQ-corrected sampled softmax)."""

    loss = "infonce"


class InfoNCEPlusLoss(_RecLoss):
    loss = "infonce_plus"

    def __init__(self, *, eps: float = 0.0, lam: float = 1.1, **kw: Any) -> None:
        super().__init__(**kw)
        self._set_hparams(eps=eps, lam=lam)


class DCLLoss(_RecLoss):
    loss = "dcl"


class MINELoss(_RecLoss):
    loss = "mine"


class MINEPlusLoss(_RecLoss):
    loss = "mine_plus"

    def __init__(self, *, lam: float = 1.1, **kw: Any) -> None:
        super().__init__(**kw)
        self._set_hparams(lam=lam)


class BPRLoss(_RecLoss):
    loss = "bpr"

    def __init__(self, *, neg_reduction: str = "mean", **kw: Any) -> None:
        super().__init__(**kw)
        self._set_hparams(neg_reduction=neg_reduction)


class BCELoss(_RecLoss):
    """BCE, or gBCE (gSASRec) with ``beta`` ≠ 1."""

    loss = "bce"

    def __init__(self, *, beta: float = 1.0, neg_reduction: str = "mean", **kw: Any) -> None:
        super().__init__(**kw)
        self._set_hparams(beta=beta, neg_reduction=neg_reduction)


class CCLLoss(_RecLoss):
    loss = "ccl"

    def __init__(self, *, margin: float = 0.5, neg_weight: float = 1.0, neg_reduction: str = "mean",
                 **kw: Any) -> None:
        super().__init__(**kw)
        self._set_hparams(margin=margin, neg_weight=neg_weight, neg_reduction=neg_reduction)


class SoftmaxCELoss(_RecLoss):
    """Full-catalogue softmax cross-entropy: ``loss(query [..., d], table [I, d], target [...])``; a target
    equal to ``ignore_index`` (−100) is ignored like a padded row."""

    loss = "softmax_ce"
    _names = {"pos_idx": "target", "neg": "table"}
    _table_only = True

    def __init__(self, *, label_smoothing: float = 0.0, z_loss: float = 0.0, **kw: Any) -> None:
        super().__init__(**kw)
        self._set_hparams(label_smoothing=label_smoothing, z_loss=z_loss)

    def _fn(self, query: Tensor, pos: Tensor | None, table: Tensor, **kw: Any) -> Tensor:
        return F.softmax_ce(query, table, kw.pop("pos_idx"), **kw)

    def forward(self, query: Tensor, table: Tensor, target: Tensor, *,  # type: ignore[override]
                padding_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self._call(query, None, table, padding_mask, {**kwargs, "pos_idx": target})
