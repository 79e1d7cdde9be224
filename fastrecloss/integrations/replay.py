"""``LossProto``-compatible losses for RePlay's ``replay.nn`` models, computed by fastrecloss.

    from fastrecloss.integrations import replay as frl
    model = SasRec(body=body, loss=frl.CE(ignore_index=padding_value))   # instead of replay.nn.loss.CE
    model = SasRec(body=body, loss=frl.CESampled())                       # negatives from the batch

Same constructors, same ``forward(model_embeddings, feature_tensors, positive_labels,
negative_labels, padding_mask, target_padding_mask)`` and the same conventions as
``replay.nn.loss``: ``target_padding_mask`` [B, L, P] is True for a *real* target (fastrecloss's
``padding_mask`` is the opposite), negatives are ``[N]`` (shared by the batch), ``[B, N]`` or
``[B, L, N]``, a negative equal to ``negative_labels_ignore_index`` (−100) is dropped and one equal
to a positive of its row (an accidental hit) is excluded. What differs is that no [B, L, I] or
[R, N] logit tensor is built: the item table is read from the model (``get_item_weights`` of a
SasRec's embedder, the item tower of a TwoTower, or ``item_weights_callback``) and handed to a
fused loss. ``CE``/``CEWeighted``/``CESampled``/``BCE``/``BCESampled`` match RePlay's values and
gradients (tests/test_integrations_replay.py); ``BCESampled`` computes log σ exactly (RePlay's
with ``log_epsilon=0``, no clamp needed) and takes ``beta`` for gBCE (gSASRec). ``LogInCE`` /
``LogInCESampled`` (one row per position, its P positives in one numerator) are ``infonce`` with
``pos_idx`` [R, P], then RePlay's −clamp(log(p + log_epsilon)) on each row's p = e^{−loss}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F

__all__ = ["CE", "CEWeighted", "CESampled", "BCE", "BCESampled", "LogInCE", "LogInCESampled"]


class _ReplayLoss(nn.Module):
    """``logits_callback`` as RePlay's losses hold it, plus the item table behind it."""

    backend: str = "auto"

    def __init__(self) -> None:
        super().__init__()
        self._logits_callback: Callable | None = None
        self.item_weights_callback: Callable[[], Tensor] | None = None

    @property
    def logits_callback(self) -> Callable[[Tensor, Tensor | None], Tensor]:
        if self._logits_callback is None:
            raise AttributeError("The callback for getting logits is not defined")
        return self._logits_callback

    @logits_callback.setter
    def logits_callback(self, func: Callable | None) -> None:
        self._logits_callback = func

    def item_table(self) -> Tensor:
        """[I, d] item vectors whose dot product with the hidden state is the model's logit."""
        if self.item_weights_callback is not None:
            return self.item_weights_callback()
        owner = getattr(self._logits_callback, "__self__", None)
        body = getattr(owner, "body", None)
        head = type(getattr(owner, "head", None)).__name__
        # a TwoTower's body has an embedder too (the raw feature embeddings): its logits use the item tower
        if head == "EmbeddingTyingHead" and hasattr(body, "item_tower"):
            return body.item_tower(None)
        if head == "EmbeddingTyingHead" and hasattr(getattr(body, "embedder", None), "get_item_weights"):
            return body.embedder.get_item_weights(None)
        raise TypeError("cannot find the item table behind logits_callback (a SasRec/TwoTower get_logits with an "
                        "EmbeddingTyingHead); set loss.item_weights_callback = lambda: table [I, d]")


def _ce_kwargs(kwargs: dict[str, Any]) -> tuple[str, int, float]:
    """The ``torch.nn.CrossEntropyLoss`` keywords RePlay passes through, checked."""
    unknown = set(kwargs) - {"ignore_index", "reduction", "label_smoothing", "weight"}
    if unknown or kwargs.get("weight") is not None:
        raise ValueError(f"unsupported CrossEntropyLoss keyword(s) {sorted(unknown)} (class weights are not "
                         "supported; use CEWeighted for per-target weights)")
    reduction = kwargs.get("reduction", "mean")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction, int(kwargs.get("ignore_index", -100)), float(kwargs.get("label_smoothing", 0.0))


def _single_positive(positive_labels: Tensor, name: str) -> None:
    if positive_labels.dim() != 3 or positive_labels.size(-1) != 1:
        raise NotImplementedError(f"{name}: positive_labels must be [B, L, 1] (multi-positive labels are not "
                                  f"supported in the {name} loss), got {tuple(positive_labels.shape)}")


def _outside(name: str, ids: Tensor, num_items: int, counts: Tensor) -> Tensor:
    """Where ``ids`` (an int tensor) lies outside the catalogue [0, I) and ``counts``: a ValueError on CPU; on CUDA
    (no host sync) the caller drops those entries, as the functional API does, so the table is never read there."""
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        got = f"{ids.dtype} tensor" if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an integer tensor of item ids, got a {got}")
    bad = ((ids < 0) | (ids >= num_items)) & counts
    if not ids.is_cuda and not torch.compiler.is_compiling() and bool(bad.any()):
        raise ValueError(f"{name} has item ids {sorted(set(ids[bad].tolist()))[:5]} outside the catalogue [0, "
                         f"{num_items}) of the item table (a real target, or a negative other than "
                         "negative_labels_ignore_index)")
    return bad


class CE(_ReplayLoss):
    """Full-catalogue cross-entropy (``replay.nn.loss.CE``), never building the [B, L, I] logits.

    Takes ``torch.nn.CrossEntropyLoss``'s ``ignore_index``, ``reduction`` and ``label_smoothing``
    (not class weights), and ``backend`` (fastrecloss's)."""

    def __init__(self, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__()
        self.backend = backend
        self.reduction, self.ignore_index, self.label_smoothing = _ce_kwargs(kwargs)

    def _loss(self, model_embeddings: Tensor, positive_labels: Tensor, target_padding_mask: Tensor,
              reduction: str, weight: Tensor | None = None) -> Tensor:
        _single_positive(positive_labels, type(self).__name__)
        labels = positive_labels.masked_fill(~target_padding_mask, self.ignore_index).reshape(-1)
        q = model_embeddings.reshape(-1, model_embeddings.size(-1))
        return F.softmax_ce(q, self.item_table(), labels, ignore_index=self.ignore_index, weight=weight,
                            label_smoothing=self.label_smoothing, reduction=reduction, backend=self.backend)

    def forward(self, model_embeddings: Tensor, feature_tensors: Any, positive_labels: Tensor,
                negative_labels: Tensor | None, padding_mask: Tensor | None, target_padding_mask: Tensor) -> Tensor:
        return self._loss(model_embeddings, positive_labels, target_padding_mask, self.reduction)


class CEWeighted(CE):
    """``replay.nn.loss.CEWeighted``: CE weighted by ``feature_tensors[feature_name]`` [B, L, 1]."""

    def __init__(self, feature_name: str, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(backend, **kwargs)
        self.feature_name = feature_name

    def forward(self, model_embeddings: Tensor, feature_tensors: Any, positive_labels: Tensor,
                negative_labels: Tensor | None, padding_mask: Tensor | None, target_padding_mask: Tensor) -> Tensor:
        sample_weight = feature_tensors[self.feature_name].reshape(-1).to(model_embeddings.dtype)
        total = self._loss(model_embeddings, positive_labels, target_padding_mask, "sum", sample_weight)
        return total / sample_weight.sum().clamp_min(1e-8)  # RePlay's weighted_mean: padded rows' weights count


class _Sampled(_ReplayLoss):
    """Rows = the real targets (b, l, p); negatives [N] | [B, N] | [B, L, N] with RePlay's masking."""

    def __init__(self, negative_labels_ignore_index: int = -100, backend: str = "auto") -> None:
        super().__init__()
        self.negative_labels_ignore_index = negative_labels_ignore_index
        self.backend = backend

    def _call(self, fn: Callable[..., Tensor], model_embeddings: Tensor, positive_labels: Tensor,
              negative_labels: Tensor, target_padding_mask: Tensor, reduction: str, **extra: Any) -> Tensor:
        B, L, P = positive_labels.shape
        if tuple(target_padding_mask.shape) != (B, L, P):
            raise ValueError(f"target_padding_mask must have positive_labels' shape {(B, L, P)}, "
                             f"got {tuple(target_padding_mask.shape)}")
        if not isinstance(negative_labels, Tensor) or tuple(negative_labels.shape[:-1]) not in ((), (B,), (B, L)):
            got = (tuple(negative_labels.shape) if isinstance(negative_labels, Tensor)
                   else type(negative_labels).__name__)
            raise ValueError(f"negative_labels must be [N], [B, N] or [B, L, N] with (B, L) = {(B, L)}, got {got}")
        d, N = model_embeddings.size(-1), negative_labels.size(-1)
        q = model_embeddings.unsqueeze(2).expand(B, L, P, d).reshape(-1, d)
        ignore = self.negative_labels_ignore_index
        table = self.item_table()
        target_padding_mask = target_padding_mask & ~_outside("positive_labels", positive_labels, table.size(0),
                                                              target_padding_mask)
        negative_labels = negative_labels.masked_fill(
            _outside("negative_labels", negative_labels, table.size(0), negative_labels != ignore), ignore)
        keep = target_padding_mask.reshape(-1)
        pos = positive_labels.reshape(-1).masked_fill(~keep, ignore)  # a padded target is an ignored row
        if negative_labels.dim() == 1:  # one pool for the whole batch: the shared layout
            ignored = negative_labels == ignore
            safe = negative_labels.masked_fill(ignored, 0)
            kw: dict[str, Any] = dict(neg=table[safe], pos=table[pos.masked_fill(~keep, 0)], weight=keep.to(q.dtype))
            if P == 1:
                kw.update(neg_mask=ignored, pos_ids=pos, neg_ids=safe, remove_accidental_hits=True)
            else:  # a negative equal to any of the position's P labels is excluded, as RePlay does
                hits = (positive_labels[..., None] == negative_labels).any(2)  # [B, L, N]
                kw["neg_mask"] = (hits[:, :, None, :] | ignored).expand(B, L, P, N).reshape(-1, N)
        else:  # per-row negatives: the indexed layout; ``ignore_index`` drops the padded ones
            if negative_labels.dim() == 2:
                negative_labels = negative_labels[:, None, :].expand(B, L, N)
            kw = dict(neg=table, pos=None, pos_idx=pos, remove_accidental_hits=P == 1,
                      neg_idx=negative_labels[:, :, None, :].expand(B, L, P, N).reshape(-1, N))
            if P > 1:
                hits = (positive_labels[..., None] == negative_labels[:, :, None, :]).any(2)  # [B, L, N]
                kw["neg_mask"] = hits[:, :, None, :].expand(B, L, P, N).reshape(-1, N)
        out = fn(q, kw.pop("pos"), kw.pop("neg"), reduction=reduction, ignore_index=ignore, backend=self.backend,
                 **kw, **extra)
        return out[keep] if reduction == "none" else out


class CESampled(_Sampled):
    """``replay.nn.loss.CESampled``: CE over [positive, sampled negatives] (InfoNCE with ε = 1)."""

    def __init__(self, negative_labels_ignore_index: int = -100, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(negative_labels_ignore_index, backend)
        # CrossEntropyLoss keywords: its ignore_index never applies (the target is column 0)
        self.reduction, _, smoothing = _ce_kwargs(kwargs)
        if smoothing:
            raise ValueError("label_smoothing is not supported by CESampled")

    def forward(self, model_embeddings: Tensor, feature_tensors: Any, positive_labels: Tensor,
                negative_labels: Tensor, padding_mask: Tensor | None, target_padding_mask: Tensor) -> Tensor:
        return self._call(F.infonce, model_embeddings, positive_labels, negative_labels, target_padding_mask,
                          self.reduction)


class BCE(_ReplayLoss):
    """``replay.nn.loss.BCE``: binary CE of every catalogue item, summed, averaged over the real targets."""

    def __init__(self, backend: str = "auto", beta: float = 1.0, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unsupported BCEWithLogitsLoss keyword(s) {sorted(kwargs)}")
        self.backend, self.beta = backend, beta

    def forward(self, model_embeddings: Tensor, feature_tensors: Any, positive_labels: Tensor,
                negative_labels: Tensor | None, padding_mask: Tensor | None, target_padding_mask: Tensor) -> Tensor:
        _single_positive(positive_labels, "BCE")
        table = self.item_table()
        q = model_embeddings.reshape(-1, model_embeddings.size(-1))
        ids = torch.arange(table.size(0), device=q.device)
        pos = positive_labels.reshape(-1).masked_fill(~target_padding_mask.reshape(-1), -100)  # padded: ignored
        return F.bce(q, None, table, pos_idx=pos, neg_ids=ids, remove_accidental_hits=True, beta=self.beta,
                     neg_reduction="sum", backend=self.backend)


class BCESampled(_Sampled):
    """``replay.nn.loss.BCESampled``; ``beta`` ≠ 1 is gBCE (gSASRec). log σ is exact, so ``log_epsilon``
    and ``clamp_border`` (RePlay's guards for its log(σ + ε)) are accepted and have no effect."""

    def __init__(self, log_epsilon: float = 1e-6, clamp_border: float = 100.0, negative_labels_ignore_index: int = -100,
                 beta: float = 1.0, backend: str = "auto") -> None:
        super().__init__(negative_labels_ignore_index, backend)
        self.log_epsilon, self.clamp_border, self.beta = log_epsilon, clamp_border, beta

    def forward(self, model_embeddings: Tensor, feature_tensors: Any, positive_labels: Tensor,
                negative_labels: Tensor, padding_mask: Tensor | None, target_padding_mask: Tensor) -> Tensor:
        return self._call(F.bce, model_embeddings, positive_labels, negative_labels, target_padding_mask, "mean",
                          beta=self.beta, neg_reduction="sum")


class _LogInCE(_ReplayLoss):
    """One row per position (b, l) with a real target; its P targets share the numerator:
    L = −log Σ_P e^{s_p} / (Σ_P e^{s_p} + Σ_n e^{s_n}), n over the negatives that equal none of the
    position's P labels (padded slots included, as RePlay masks them) nor, among sampled negatives,
    ``negative_labels_ignore_index``."""

    def __init__(self, log_epsilon: float, clamp_border: float, negative_labels_ignore_index: int,
                 backend: str) -> None:
        super().__init__()
        self.log_epsilon, self.clamp_border = log_epsilon, clamp_border
        self.negative_labels_ignore_index, self.backend = negative_labels_ignore_index, backend

    def _loss(self, model_embeddings: Tensor, positive_labels: Tensor, target_padding_mask: Tensor, table: Tensor,
              negative_labels: Tensor | None, cardinality: int | None = None) -> Tensor:
        if positive_labels.dim() != 3 or tuple(target_padding_mask.shape) != tuple(positive_labels.shape):
            raise ValueError(f"positive_labels and target_padding_mask must be [B, L, P] of one shape, got "
                             f"{tuple(positive_labels.shape)} and {tuple(target_padding_mask.shape)}")
        B, L, P = positive_labels.shape
        ignore = self.negative_labels_ignore_index
        q = model_embeddings.reshape(B * L, -1)
        pos_idx = positive_labels.masked_fill(~target_padding_mask, ignore).reshape(B * L, P)
        padded = positive_labels.masked_fill(target_padding_mask, -1).reshape(B * L, P, 1)  # RePlay masks these too
        kw: dict[str, Any] = {}
        if negative_labels is None:  # the catalogue's first ``cardinality`` items (RePlay's arange); positives: any
            ids = torch.arange(table.size(0), device=q.device)
            if cardinality is not None and cardinality < table.size(0):
                kw["neg_mask"] = ids >= cardinality
        else:
            N = negative_labels.size(-1)
            if negative_labels.dim() == 2:
                negative_labels = negative_labels[:, None, :]
            ids = kw["neg_idx"] = negative_labels.expand(B, L, N).reshape(B * L, N)
        if bool(((padded >= 0) & (padded < table.size(0))).any()):
            hits = (padded == ids.reshape(-1 if ids.dim() == 2 else 1, 1, ids.size(-1))).any(1)
            kw["neg_mask"] = hits | kw["neg_mask"] if "neg_mask" in kw else hits
        rows = F.infonce(q, None, table, pos_idx=pos_idx, ignore_index=ignore, reduction="none",
                         backend=self.backend, **kw)
        rows = rows[target_padding_mask.any(-1).reshape(-1)]
        log_p = -rows if self.log_epsilon == 0 else torch.logaddexp(-rows, torch.tensor(self.log_epsilon).log())
        return -log_p.clamp(-self.clamp_border, self.clamp_border).mean()


class LogInCE(_LogInCE):
    """``replay.nn.loss.LogInCE``: the catalogue's first ``cardinality`` items as negatives (all of it when that is
    the table's size; a smaller one leaves the rest out of the negatives only, as RePlay's does)."""

    def __init__(self, cardinality: int, log_epsilon: float = 1e-6, clamp_border: float = 100.0,
                 negative_labels_ignore_index: int = -100, backend: str = "auto") -> None:
        super().__init__(log_epsilon, clamp_border, negative_labels_ignore_index, backend)
        self.cardinality = cardinality

    def forward(self, model_embeddings: Tensor, feature_tensors: Any, positive_labels: Tensor,
                negative_labels: Tensor | None, padding_mask: Tensor | None, target_padding_mask: Tensor) -> Tensor:
        table = self.item_table()
        if table.size(0) < self.cardinality:
            raise ValueError(f"cardinality is {self.cardinality} but the item table has {table.size(0)} rows")
        return self._loss(model_embeddings, positive_labels, target_padding_mask, table, None, self.cardinality)


class LogInCESampled(_LogInCE):
    """``replay.nn.loss.LogInCESampled``: negatives [N], [B, N] or [B, L, N], −100 (the ignore index) dropped."""

    def __init__(self, log_epsilon: float = 1e-6, clamp_border: float = 100.0, negative_labels_ignore_index: int = -100,
                 backend: str = "auto") -> None:
        super().__init__(log_epsilon, clamp_border, negative_labels_ignore_index, backend)

    def forward(self, model_embeddings: Tensor, feature_tensors: Any, positive_labels: Tensor,
                negative_labels: Tensor, padding_mask: Tensor | None, target_padding_mask: Tensor) -> Tensor:
        return self._loss(model_embeddings, positive_labels, target_padding_mask, self.item_table(), negative_labels)
