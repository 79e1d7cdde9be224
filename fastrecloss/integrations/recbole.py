"""Run RecBole models on fastrecloss losses without editing RecBole.

    from fastrecloss.integrations.recbole import use_fastrecloss
    model = SASRec(config, train_data.dataset)             # loss_type: CE, train_neg_sample_args: None
    use_fastrecloss(model, loss="softmax_ce")              # full catalogue, never builds B×I logits
    use_fastrecloss(model, loss="infonce", negatives="popularity", num_negatives=256,
                    item_counts=train_data.dataset)        # sampled softmax with logQ correction
    Trainer(config, model).fit(train_data, valid_data)     # RecBole's own trainer, unchanged

``use_fastrecloss`` replaces the model's ``calculate_loss`` (an instance attribute: the class and
every other model are untouched; ``restore_loss`` undoes it). The query vectors, item table and
regularisers are taken exactly as the model's own ``calculate_loss`` takes them, so
``loss="softmax_ce"`` on a CE model, and ``loss="bpr"`` with the dataloader's negatives on a
model trained with ``BPRLoss``, compute RecBole's own loss (tests/test_integrations_recbole.py).

Supported models: the sequential ones whose CE loss is ``cross_entropy(seq_output · Eᵀ, pos)``
(``SEQUENTIAL``, BERT4Rec with its masked positions and output bias included) and the general
ones trained with ``BPRLoss`` listed in ``GENERAL``. Negatives for every other loss:
``'interaction'`` (the dataloader's ``neg_item_id``, per row; ``sample_num=K`` groups RecBole's K
repeats of a row into one row with K negatives), ``'uniform'``/``'popularity'`` (a pool of
``num_negatives`` shared by the batch, drawn from the non-padding ids — popularity ∝
count^``alpha`` — logQ-corrected for the contrastive losses unless ``logq_correction=False``) or
``'in_batch'`` (the batch's own positives; logQ from ``item_counts`` when given). ``run_recbole`` is
``recbole.quick_start.run_recbole`` with the loss replaced.

RecBole 1.2.1 and current NumPy/SciPy/torch: it needs ``pandas<3``, and ``setuptools<81`` for
``recbole.quick_start`` (its ``ray`` 2.x imports ``pkg_resources``); its ``Config`` aliases
``np.float_``/``np.complex_``/``np.unicode_`` and ``ray.tune`` ``np.bool8`` (gone in NumPy 2), and
LightGCN's adjacency uses ``dok_matrix._update`` (gone in SciPy 1.12) — importing this module adds
those aliases and that method where missing (``recbole_compat``), so import it before building the
``Config`` or importing ``recbole.quick_start``; and
it loads checkpoints with a bare ``torch.load``, which fails on torch ≥ 2.6 (``weights_only``
became the default): set ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for
``Trainer.evaluate(load_best_model=True)`` (a checkpoint you wrote yourself), or pass
``load_best_model=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import functional as F
from ..sampling import NegativeSampler, in_batch_log_q

LOSSES: dict[str, Callable[..., Tensor]] = {
    "softmax_ce": F.softmax_ce, "infonce": F.infonce, "infonce_plus": F.infonce_plus, "dcl": F.dcl,
    "mine": F.mine, "mine_plus": F.mine_plus, "bpr": F.bpr, "bce": F.bce, "ccl": F.ccl,
}
def recbole_compat() -> None:
    """Add the NumPy aliases and the SciPy method RecBole 1.2.1 uses, where they are missing (never replaces)."""
    import numpy as np

    for old, new in (("float_", "float64"), ("complex_", "complex128"), ("unicode_", "str_"), ("bool8", "bool_")):
        if old not in np.__dict__:
            setattr(np, old, getattr(np, new))
    try:
        from scipy.sparse import dok_matrix
    except ImportError:  # pragma: no cover - scipy comes with RecBole
        return
    if not hasattr(dok_matrix, "_update"):
        dok_matrix._update = lambda self, data: self._dict.update(data)


recbole_compat()

CONTRASTIVE = ("infonce", "infonce_plus", "dcl", "mine", "mine_plus")
NEGATIVE_SOURCES = ("interaction", "uniform", "popularity", "in_batch")


@dataclass
class Rows:
    """What a model's loss is computed from: R query rows against an item table."""

    query: Tensor  # [R, d]
    table: Tensor  # [I, d]
    target: Tensor  # [R] ids into ``table``
    neg: Tensor | None  # [R, K] the dataloader's negatives, if any
    weight: Tensor | None = None  # [R]; 0 = a padded row
    extra: Tensor | float = 0.0  # the model's own regularisers, added as it adds them


def _neg(model: nn.Module, interaction: Any, field: str) -> Tensor | None:
    name = getattr(model, field, None)
    return interaction[name] if name is not None and name in interaction else None


def _seq_rows(model: nn.Module, interaction: Any, query: Tensor, extra: Tensor | float = 0.0) -> Rows:
    neg = _neg(model, interaction, "NEG_ITEM_ID")
    return Rows(query, model.item_embedding.weight, interaction[model.POS_ITEM_ID],
                None if neg is None else neg.reshape(query.shape[0], -1), extra=extra)


def _standard(model: nn.Module, it: Any) -> Rows:
    return _seq_rows(model, it, model.forward(it[model.ITEM_SEQ], it[model.ITEM_SEQ_LEN]))


def _gcsan(model: nn.Module, it: Any) -> Rows:
    rows = _standard(model, it)
    rows.extra = model.reg_weight * model.reg_loss(model.item_embedding.weight)
    return rows


def _caser(model: nn.Module, it: Any) -> Rows:
    reg = model.reg_loss([model.user_embedding.weight, model.item_embedding.weight, model.conv_v.weight,
                          model.fc1.weight, model.fc2.weight])
    query = model.forward(it[model.USER_ID], it[model.ITEM_SEQ])
    return _seq_rows(model, it, query, model.reg_weight * reg + model.reg_loss_conv_h())


def _nextitnet(model: nn.Module, it: Any) -> Rows:
    reg = model.reg_loss([model.item_embedding.weight, model.final_layer.weight])
    return _seq_rows(model, it, model.forward(it[model.ITEM_SEQ]), model.reg_weight * reg + model.reg_loss_rb())


def _bert4rec(model: nn.Module, it: Any) -> Rows:
    """BERT4Rec: the masked positions only; its output bias rides along as one more feature."""
    seq, masked_index = it[model.MASK_ITEM_SEQ], it[model.MASK_INDEX]
    hidden = model.forward(seq)  # [B, L, H]
    pick = model.multi_hot_embed(masked_index, seq.size(-1)).view(masked_index.size(0), masked_index.size(1), -1)
    query = torch.bmm(pick, hidden).reshape(-1, hidden.size(-1))  # [B·mask_len, H]
    table = model.item_embedding.weight[: model.n_items]
    query = torch.cat([query, query.new_ones(query.shape[0], 1)], dim=1)
    table = torch.cat([table, model.output_bias[:, None].to(table.dtype)], dim=1)
    neg = it[model.NEG_ITEMS].reshape(-1, 1) if model.NEG_ITEMS in it else None
    return Rows(query, table, it[model.POS_ITEMS].reshape(-1), neg, (masked_index > 0).reshape(-1).to(query.dtype))


def _bpr(model: nn.Module, it: Any) -> Rows:
    neg = _neg(model, it, "NEG_ITEM_ID")
    return Rows(model.get_user_embedding(it[model.USER_ID]), model.item_embedding.weight, it[model.ITEM_ID],
                None if neg is None else neg.reshape(-1, 1))


def _lightgcn(model: nn.Module, it: Any) -> Rows:
    model.restore_user_e = model.restore_item_e = None  # as its calculate_loss does: clear the eval cache
    user, pos = it[model.USER_ID], it[model.ITEM_ID]
    neg = _neg(model, it, "NEG_ITEM_ID")
    users_all, items_all = model.forward()
    ego = [model.user_embedding(user), model.item_embedding(pos)]
    if neg is not None:
        ego.append(model.item_embedding(neg))
    reg = model.reg_weight * model.reg_loss(*ego, require_pow=model.require_pow)
    return Rows(users_all[user], items_all, pos, None if neg is None else neg.reshape(-1, 1), extra=reg)


SEQUENTIAL: dict[str, Callable[[nn.Module, Any], Rows]] = {
    **dict.fromkeys(("SASRec", "GRU4Rec", "NARM", "STAMP", "LightSANs", "SASRecF", "GRU4RecF", "FDSA", "SRGNN"),
                    _standard),
    "GCSAN": _gcsan, "Caser": _caser, "NextItNet": _nextitnet, "BERT4Rec": _bert4rec,
}
GENERAL: dict[str, Callable[[nn.Module, Any], Rows]] = {"BPR": _bpr, "LightGCN": _lightgcn}


def count_items(dataset: Any) -> Tensor:
    """Interactions per item id ``[item_num]`` of a RecBole ``Dataset`` (for ``negatives='popularity'``)."""
    ids = torch.as_tensor(dataset.inter_feat[dataset.iid_field]).reshape(-1).long()
    return torch.bincount(ids, minlength=dataset.item_num)


def as_item_counts(item_counts: Any, n_items: int) -> Tensor:
    """``item_counts`` as a [n_items] tensor: a RecBole ``Dataset`` (:func:`count_items`), its ``item_counter``
    (a ``{item id: count}`` mapping, ids missing from it count 0), or a tensor / array / sequence [n_items]."""
    if hasattr(item_counts, "inter_feat"):
        counts = count_items(item_counts)
    elif isinstance(item_counts, Mapping):
        counts = torch.zeros(n_items, dtype=torch.float64)
        ids = torch.as_tensor([int(i) for i in item_counts], dtype=torch.long)
        if ids.numel() and not bool(((ids >= 0) & (ids < n_items)).all()):
            raise ValueError(f"item_counts has item ids in [{int(ids.min())}, {int(ids.max())}], outside the "
                             f"model's [0, n_items) = [0, {n_items})")
        counts[ids] = torch.as_tensor([float(c) for c in item_counts.values()], dtype=torch.float64)
    else:
        counts = torch.as_tensor(item_counts.detach().cpu() if isinstance(item_counts, Tensor) else
                                 np.asarray(item_counts))
    if counts.dim() != 1 or counts.shape[0] != n_items:
        raise ValueError(f"item_counts must have one entry per item id, shape [n_items] = ({n_items},), got shape "
                         f"{tuple(counts.shape)} (a Dataset other than the model's?)")
    return counts


def _grouped(r: Rows, k: int) -> Rows:
    """RecBole's B·k rows (the batch repeated k times, one negative each: row b + i·B holds interaction b's
    i-th negative) as B rows with k negatives each; the regulariser stays as the model computed it."""
    n = r.query.shape[0]
    if r.neg is None or n % k or r.neg.shape != (n, 1):
        raise ValueError(f"sample_num = {k}: expected the dataloader's rows (a multiple of {k}, one negative each), "
                         f"got {n} rows and negatives of shape {None if r.neg is None else tuple(r.neg.shape)}")
    b = n // k
    if not r.target.is_cuda and not bool((r.target.view(k, b) == r.target[:b]).all()):
        raise ValueError(f"sample_num = {k}: the batch is not {k} repeats of its first {b} rows (is it "
                         "train_neg_sample_args' sample_num?)")
    weight = None if r.weight is None else r.weight[:b]
    return Rows(r.query[:b], r.table, r.target[:b], r.neg.reshape(k, b).T, weight, r.extra)


def _check_counts_use(negatives: str | None, item_counts: Tensor | None, alpha: float,
                      logq_correction: bool | None) -> None:
    """``item_counts``/``alpha``/``logq_correction=True`` where they would be ignored: an error, never silence."""
    if alpha != 1.0 and negatives != "popularity":
        raise ValueError(f"alpha (q_j ∝ count_j^alpha, train_neg_sample_args' alpha) is for "
                         f"negatives='popularity', got negatives={negatives!r}")
    if negatives in ("uniform", "interaction", None) and item_counts is not None:
        why = {"uniform": "draws ids 1..n_items-1 alike, as RecBole's distribution 'uniform' (its logQ is a constant)",
               "interaction": "takes the dataloader's negatives (train_neg_sample_args), drawn by RecBole",
               None: "scores the whole catalogue (loss='softmax_ce')"}[negatives]
        raise ValueError(f"item_counts is used by negatives='popularity' (the draw and its logQ) and 'in_batch' "
                         f"(its logQ) only; negatives={negatives!r} {why}: pass no item_counts")
    if negatives in ("interaction", None) and logq_correction:
        raise ValueError(f"logq_correction=True needs negatives drawn here ('uniform', 'popularity', 'in_batch'): "
                         f"negatives={negatives!r} has no known sampling probability (RecBole's sampler also "
                         "skips each user's items)")
    if negatives == "in_batch" and logq_correction and item_counts is None:
        raise ValueError("logq_correction=True with negatives='in_batch' needs item_counts (the Dataset or a "
                         "[n_items] tensor): the logQ of an in-batch negative is log(R · its share of interactions)")


class FastRecLoss:
    """The ``calculate_loss`` that :func:`use_fastrecloss` installs (callable on an ``Interaction``)."""

    def __init__(self, model: nn.Module, loss: str, rows: Callable[[nn.Module, Any], Rows], negatives: str | None,
                 num_negatives: int, item_counts: Tensor | None, logq_correction: bool | None,
                 generator: torch.Generator | None, loss_kwargs: dict[str, Any], alpha: float = 1.0,
                 sample_num: int = 1) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
        if loss == "softmax_ce" and negatives is not None:
            raise ValueError("loss='softmax_ce' scores the whole catalogue: pass no negatives")
        if loss != "softmax_ce" and negatives not in NEGATIVE_SOURCES:
            raise ValueError(f"negatives must be one of {', '.join(map(repr, NEGATIVE_SOURCES))}, got {negatives!r}")
        for key in ("weight", "reduction", "neg_idx", "pos_idx", "in_batch", "log_q", "pos_log_q"):
            if key in loss_kwargs:
                raise ValueError(f"use_fastrecloss sets {key} itself; it is not a loss keyword here")
        _check_counts_use(negatives, item_counts, alpha, logq_correction)
        self.model, self.loss, self.rows, self.negatives = model, loss, rows, negatives
        self.item_counts = item_counts
        self.correct = loss in CONTRASTIVE if logq_correction is None else bool(logq_correction)
        self.sampler: NegativeSampler | None = None
        self.num_negatives = num_negatives
        if isinstance(sample_num, bool) or not isinstance(sample_num, int) or sample_num < 1:
            raise ValueError(f"sample_num must be a positive int (train_neg_sample_args' sample_num), got "
                             f"{sample_num!r}")
        if sample_num > 1 and negatives != "interaction":
            raise ValueError(f"sample_num groups the dataloader's negatives (negatives='interaction'), got "
                             f"negatives={negatives!r}")
        self.sample_num = sample_num
        if negatives in ("uniform", "popularity"):  # the padding id 0 is never drawn
            if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
                raise ValueError(f"num_negatives must be a positive int, got {num_negatives!r}")
            if negatives == "popularity" and item_counts is None:
                raise ValueError("negatives='popularity' needs item_counts (a [n_items] tensor or the Dataset)")
            # _check_counts_use has refused item_counts and alpha ≠ 1 for 'uniform'
            self.sampler = NegativeSampler(self._num_items(), negatives, item_counts, alpha, low=1,
                                           generator=generator)
        self.loss_kwargs = loss_kwargs

    def _in_batch_log_q(self, target: Tensor, padded: Tensor | None) -> Tensor:
        """log(R_real · p_j) of each row's positive as an in-batch negative; padded rows (masked columns) get 0."""
        if padded is None:
            return in_batch_log_q(target, self.item_counts)
        seen = int(self.item_counts.argmax())  # any id with a count: a stand-in for the padded rows' target
        log_q = in_batch_log_q(target.masked_fill(padded, seen), self.item_counts)
        real = (~padded).sum().clamp_min(1).to(log_q.dtype)
        return (log_q + (real / target.shape[0]).log()).masked_fill(padded, 0.0)

    def _num_items(self) -> int:
        return int(self.model.n_items)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.loss_kwargs.items())
        return f"FastRecLoss(loss={self.loss!r}, negatives={self.negatives!r}{extra})"

    def __call__(self, interaction: Any) -> Tensor:
        r = self.rows(self.model, interaction)
        fn, kw = LOSSES[self.loss], dict(self.loss_kwargs, weight=r.weight)
        if self.loss == "softmax_ce":
            return fn(r.query, r.table, r.target, **kw) + r.extra
        if self.negatives == "interaction":
            if r.neg is None:
                raise ValueError("negatives='interaction' needs the dataloader's negatives (train_neg_sample_args "
                                 "in the RecBole config); or use negatives='uniform'/'popularity'/'in_batch'")
            if self.sample_num > 1:
                r = _grouped(r, self.sample_num)
                kw["weight"] = r.weight
            return fn(r.query, None, r.table, pos_idx=r.target, neg_idx=r.neg, **kw) + r.extra
        pos = r.table[r.target]
        padded = None if r.weight is None else r.weight == 0  # BERT4Rec's unused mask slots (target: the padding id)
        if self.negatives == "in_batch":
            if self.correct and self.item_counts is not None:
                kw["log_q"] = self._in_batch_log_q(r.target, padded).to(r.query.dtype)
            if padded is not None:  # a padded row's positive is no negative of the others either
                kw["neg_mask"] = padded
            return fn(r.query, pos, None, in_batch=True, pos_ids=r.target, remove_accidental_hits=True, **kw) + r.extra
        ids, log_q = self.sampler.sample_shared(self.num_negatives, r.query.device)
        if self.correct:
            pos_log_q = self.sampler.log_q_table(self.num_negatives, r.query.device)[r.target]
            if padded is not None:  # the padding id's logQ is −inf (never drawn): +inf, then NaN, in an ignored row
                pos_log_q = pos_log_q.masked_fill(padded, 0.0)
            kw.update(log_q=log_q.to(r.query.dtype), pos_log_q=pos_log_q.to(r.query.dtype))
        return fn(r.query, pos, r.table[ids], pos_ids=r.target, neg_ids=ids, remove_accidental_hits=True,
                  **kw) + r.extra


def use_fastrecloss(model: nn.Module, loss: str = "softmax_ce", *, negatives: str | None = None,
                    num_negatives: int = 256, item_counts: Tensor | Any | None = None,
                    logq_correction: bool | None = None, generator: torch.Generator | None = None,
                    rows: Callable[[nn.Module, Any], Rows] | None = None, alpha: float = 1.0,
                    sample_num: int = 1, **loss_kwargs: Any) -> nn.Module:
    """Make ``model.calculate_loss`` compute ``loss`` with fastrecloss; returns the model.

    ``loss``: one of ``LOSSES``; ``loss_kwargs`` go to it (``temperature``, ``lam``, ``beta``,
    ``backend`` ...). ``negatives``: ``NEGATIVE_SOURCES`` (default ``'interaction'`` for general
    models, ``'uniform'`` for sequential ones; none for ``softmax_ce``). ``item_counts``: a
    RecBole ``Dataset`` (``train_data.dataset``), its ``item_counter``, or a ``[n_items]`` tensor/array — for
    ``'popularity'`` (q_j ∝ count_j^``alpha``, RecBole's ``train_neg_sample_args`` ``alpha``) and the
    in-batch logQ only: with ``'uniform'``, ``'interaction'`` or ``softmax_ce`` it is an error, as are
    ``alpha`` ≠ 1 without ``'popularity'`` and ``logq_correction=True`` where no logQ is known.
    ``sample_num``: ``train_neg_sample_args``' sample_num K with ``'interaction'`` — RecBole repeats each
    row K times with one negative each; the loss then sees each row once with its K negatives (the same
    BPR/BCE/CCL mean, and a (K+1)-way softmax for the contrastive losses instead of K 2-way ones).
    ``rows``: for a model not in ``SEQUENTIAL``/``GENERAL``, a function ``(model, interaction)
    -> Rows`` that takes the query, table and target as that model's ``calculate_loss`` does.
    """
    name = type(model).__name__
    found = rows or SEQUENTIAL.get(name) or GENERAL.get(name)
    if found is None:
        raise ValueError(f"use_fastrecloss does not know how {name} computes its loss; supported: "
                         f"{', '.join([*SEQUENTIAL, *GENERAL])}, or pass rows=(model, interaction) -> Rows")
    if name in SEQUENTIAL and getattr(model, "loss_type", "CE") not in ("CE", "BPR"):
        raise ValueError(f"{name} has loss_type {model.loss_type!r}; expected 'CE' or 'BPR'")
    if loss != "softmax_ce" and negatives is None:
        negatives = "interaction" if name in GENERAL else "uniform"
    tau = loss_kwargs.get("temperature")
    if isinstance(tau, nn.Parameter) and not any(p is tau for p in model.parameters()):
        raise ValueError("temperature is an nn.Parameter that the model does not hold: RecBole's Trainer optimises "
                         "model.parameters() only, so it would never be learned — assign it to the model first "
                         "(model.tau = nn.Parameter(...); use_fastrecloss(model, ..., temperature=model.tau))")
    if item_counts is not None:
        item_counts = as_item_counts(item_counts, int(model.n_items))
    model.calculate_loss = FastRecLoss(model, loss, found, negatives, num_negatives, item_counts, logq_correction,
                                       generator, loss_kwargs, alpha, sample_num)
    return model


def restore_loss(model: nn.Module) -> nn.Module:
    """Undo :func:`use_fastrecloss`: the model's class ``calculate_loss`` is used again."""
    if isinstance(model.__dict__.get("calculate_loss"), FastRecLoss):
        del model.calculate_loss
    return model


def run_recbole(model: str, dataset: str, config_file_list: list[str] | None = None,
                config_dict: dict[str, Any] | None = None, saved: bool = True, *, loss: str = "softmax_ce",
                **use_kwargs: Any) -> dict[str, Any]:
    """``recbole.quick_start.run_recbole`` with the model's loss replaced by :func:`use_fastrecloss` (which that
    function cannot do: it builds the model itself, by name). Same arguments, same steps (seeding, logger,
    dataset, split, model, ``Trainer.fit``, test) and the same result dict; ``loss`` and ``use_kwargs`` go to
    :func:`use_fastrecloss`, with ``item_counts`` defaulting to the training split where the negatives use it.
    The best checkpoint is reloaded by this function (``torch.load(weights_only=False)`` of the file the
    trainer has just written), so RecBole's bare ``torch.load`` is not needed on torch ≥ 2.6."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    net = get_model(config["model"])(config, train.dataset).to(config["device"])
    negatives = use_kwargs.get("negatives") or (None if loss == "softmax_ce" else
                                                "interaction" if type(net).__name__ in GENERAL else "uniform")
    wants_counts = negatives == "popularity" or (negatives == "in_batch" and use_kwargs.get("logq_correction") is not
                                                 False and loss in CONTRASTIVE)
    if wants_counts and use_kwargs.get("item_counts") is None:
        use_kwargs["item_counts"] = train.dataset
    neg_args = config["train_neg_sample_args"] or {}
    if negatives == "interaction" and neg_args.get("sample_num") not in (None, "none"):
        use_kwargs.setdefault("sample_num", int(neg_args["sample_num"]))
    use_fastrecloss(net, loss, **use_kwargs)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
    best_score, best_result = trainer.fit(train, valid, saved=saved, show_progress=config["show_progress"])
    if saved:
        state = torch.load(trainer.saved_model_file, map_location=config["device"], weights_only=False)
        net.load_state_dict(state["state_dict"])
        net.load_other_parameter(state.get("other_parameter"))
    test_result = trainer.evaluate(test, load_best_model=False, show_progress=config["show_progress"])
    return {"best_valid_score": best_score, "valid_score_bigger": config["valid_metric_bigger"],
            "best_valid_result": best_result, "test_result": test_result}
