"""fastrecloss.integrations.replay against the real RePlay (no mocks): same loss, same gradients.

A RePlay SasRec provides ``logits_callback`` (its ``get_logits``) to both RePlay's loss and ours;
the inputs follow RePlay's conventions (left padding with the padding id, ``target_padding_mask``
True = real target, negatives padded with −100 and colliding with positives on purpose). Runs in
the second CI command (``python3 dev.py integrations``); skips only outside CI when RePlay is absent.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from integrations_util import assert_same, require

pytestmark = [pytest.mark.integrations, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

require("replay.nn")
require("lightning")
import lightning  # noqa: E402
from replay.data import FeatureHint, FeatureSource, FeatureType  # noqa: E402
from replay.data.nn import TensorFeatureInfo, TensorFeatureSource, TensorSchema  # noqa: E402
from replay.nn import loss as rl  # noqa: E402
from replay.nn.lightning import LightningModule  # noqa: E402
from replay.nn.sequential import SasRec  # noqa: E402

from fastrecloss.integrations import replay as frl  # noqa: E402

NI, D, B, L = 20, 8, 3, 6  # catalogue, embedding dim, batch, sequence length


def schema() -> TensorSchema:
    return TensorSchema([TensorFeatureInfo(
        "item_id", is_seq=True, feature_type=FeatureType.CATEGORICAL, embedding_dim=D, padding_value=NI,
        cardinality=NI, feature_hint=FeatureHint.ITEM_ID,
        feature_sources=[TensorFeatureSource(FeatureSource.INTERACTIONS, "item_id")])])


def sasrec(loss: Any) -> SasRec:
    base = SasRec.from_params(schema(), embedding_dim=D, num_heads=1, num_blocks=1, max_sequence_length=L,
                              dropout=0.0)
    return SasRec(body=base.body, loss=loss)


def batch(gen: torch.Generator, num_positives: int = 1, pad_value: int = NI, duplicate: bool = False
          ) -> dict[str, Any]:
    """Left-padded sequences of ids in [0, NI) (padding id NI); targets = the next items; a padded
    positive slot holds ``pad_value``, ``duplicate`` repeats one position's first positive."""
    lengths = torch.tensor([L, 4, 2])
    items = torch.randint(0, NI, (B, L + num_positives), generator=gen)
    real = torch.arange(L)[None, :] >= (L - lengths)[:, None]  # [B, L], True = real item (RePlay's polarity)
    seq = items[:, :L].masked_fill(~real, NI)
    positives = torch.stack([items[:, 1 + p: 1 + p + L] for p in range(num_positives)], dim=-1)
    target_mask = real[..., None].expand(B, L, num_positives).clone()
    if num_positives > 1:
        target_mask[0, -1, 1] = False  # one padded slot among the positives
    positives = positives.masked_fill(~target_mask, NI)
    if num_positives > 1:
        positives[0, -1, 1] = pad_value
    if duplicate:
        positives[1, -1, 1] = positives[1, -1, 0]
    return {"feature_tensors": {"item_id": seq}, "padding_mask": real, "positive_labels": positives,
            "target_padding_mask": target_mask}


def negatives(gen: torch.Generator, shape: tuple[int, ...], positives: torch.Tensor) -> torch.Tensor:
    neg = torch.randint(0, NI, shape, generator=gen)
    flat = neg.view(-1)
    flat[::5] = -100  # RePlay's padding of negatives
    if len(shape) == 1:
        flat[1] = positives[0, -1, 0]  # an accidental hit
    else:
        neg[0, ..., 1] = positives[0, -1, 0] if len(shape) == 2 else positives[0, :, 0]
    return neg


def compare(ours: torch.nn.Module, theirs: torch.nn.Module, gen: torch.Generator, *, num_positives: int = 1,
            neg_shape: tuple[int, ...] | None = None, features: dict[str, torch.Tensor] | None = None,
            **batch_kw: Any) -> None:
    model = sasrec(theirs)
    ours.logits_callback = model.get_logits
    b = batch(gen, num_positives, **batch_kw)
    hidden = torch.randn(B, L, D, generator=gen, requires_grad=True)
    neg = None if neg_shape is None else negatives(gen, neg_shape, b["positive_labels"])
    feats = {**b["feature_tensors"], **(features or {})}

    def run(loss: torch.nn.Module) -> torch.Tensor:
        return loss(hidden, feats, b["positive_labels"], neg, b["padding_mask"], b["target_padding_mask"].clone())

    table = model.body.embedder.feature_embedders["item_id"].emb.weight
    assert_same(run(ours), run(theirs), [hidden, table])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_ce_full_catalogue(gen: torch.Generator, label_smoothing: float) -> None:
    compare(frl.CE(ignore_index=NI, label_smoothing=label_smoothing),
            rl.CE(ignore_index=NI, label_smoothing=label_smoothing), gen)


def test_ce_weighted(gen: torch.Generator) -> None:
    w = torch.rand(B, L, 1, generator=gen)
    compare(frl.CEWeighted("w", ignore_index=NI), rl.CEWeighted("w", ignore_index=NI), gen, features={"w": w})


@pytest.mark.parametrize("neg_shape", [(7,), (B, 7), (B, L, 7)], ids=["shared", "per-sequence", "per-position"])
@pytest.mark.parametrize("num_positives", [1, 2])
def test_ce_sampled(gen: torch.Generator, neg_shape: tuple[int, ...], num_positives: int) -> None:
    compare(frl.CESampled(ignore_index=NI), rl.CESampled(ignore_index=NI), gen, neg_shape=neg_shape,
            num_positives=num_positives)


def test_bce_full_catalogue(gen: torch.Generator) -> None:
    compare(frl.BCE(), rl.BCE(), gen)


@pytest.mark.parametrize("neg_shape", [(7,), (B, L, 7)], ids=["shared", "per-position"])
@pytest.mark.parametrize("num_positives", [1, 2])
def test_bce_sampled(gen: torch.Generator, neg_shape: tuple[int, ...], num_positives: int) -> None:
    # RePlay's BCESampled takes log(σ + log_epsilon); with log_epsilon = 0 it is the exact loss ours computes
    compare(frl.BCESampled(), rl.BCESampled(log_epsilon=0.0), gen, neg_shape=neg_shape, num_positives=num_positives)


def test_gbce_weights_the_positive_term(gen: torch.Generator) -> None:
    """gBCE (β ≠ 1) = β·(positive term) + (negative term) of RePlay's BCESampled, split by hand."""
    model = sasrec(rl.CE(ignore_index=NI))
    b = batch(gen)
    hidden = torch.randn(B, L, D, generator=gen, requires_grad=True)
    neg = negatives(gen, (7,), b["positive_labels"])
    losses = {}
    for beta in (1.0, 0.25):
        loss = frl.BCESampled(beta=beta)
        loss.logits_callback = model.get_logits
        losses[beta] = loss(hidden, None, b["positive_labels"], neg, b["padding_mask"], b["target_padding_mask"])
    rows = b["target_padding_mask"].reshape(-1)
    pos_term = torch.nn.functional.softplus(-model.get_logits(hidden.reshape(-1, D)[rows],
                                                              b["positive_labels"].reshape(-1, 1)[rows])).mean()
    torch.testing.assert_close(losses[1.0] - losses[0.25], 0.75 * pos_term)


LOGINCE_CASES = pytest.mark.parametrize("num_positives, pad_value, clamp_border", [
    (1, NI, 100.0), (3, NI, 100.0), (3, 5, 100.0), (2, 0, 2.0)],
    ids=["one", "several", "padded-slot-in-catalogue", "clamped"])


@LOGINCE_CASES
def test_login_ce(gen: torch.Generator, num_positives: int, pad_value: int, clamp_border: float) -> None:
    compare(frl.LogInCE(NI, clamp_border=clamp_border), rl.LogInCE(NI, clamp_border=clamp_border), gen,
            num_positives=num_positives, pad_value=pad_value, duplicate=num_positives > 1)


@pytest.mark.parametrize("neg_shape", [(7,), (B, 7), (B, L, 7)], ids=["shared", "per-sequence", "per-position"])
@LOGINCE_CASES
def test_login_ce_sampled(gen: torch.Generator, neg_shape: tuple[int, ...], num_positives: int, pad_value: int,
                          clamp_border: float) -> None:
    compare(frl.LogInCESampled(clamp_border=clamp_border), rl.LogInCESampled(clamp_border=clamp_border), gen,
            neg_shape=neg_shape, num_positives=num_positives, pad_value=pad_value, duplicate=num_positives > 1)


def test_trains_sasrec_through_replays_lightning_module(gen: torch.Generator) -> None:
    model = sasrec(frl.CESampled(ignore_index=NI))
    data = []
    for _ in range(4):
        b = batch(gen)
        b["negative_labels"] = negatives(gen, (9,), b["positive_labels"])
        data.append(b)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    before = model.body.embedder.feature_embedders["item_id"].emb.weight.detach().clone()
    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LightningModule(model), train_dataloaders=loader)
    assert trainer.global_step == 8
    assert torch.isfinite(trainer.callback_metrics["train_loss_epoch"])
    assert not torch.equal(before, model.body.embedder.feature_embedders["item_id"].emb.weight.detach())


def test_errors(gen: torch.Generator) -> None:
    with pytest.raises(ValueError, match="class weights"):
        frl.CE(weight=torch.ones(NI))
    with pytest.raises(ValueError, match="label_smoothing"):
        frl.CESampled(label_smoothing=0.1)
    with pytest.raises(ValueError, match="unsupported CrossEntropyLoss"):
        frl.CE(size_average=True)
    loss = frl.CE(ignore_index=NI)
    with pytest.raises(AttributeError, match="callback"):
        _ = loss.logits_callback
    loss.logits_callback = lambda emb, ids=None: emb
    b = batch(gen)
    with pytest.raises(TypeError, match="item_weights_callback"):
        loss(torch.randn(B, L, D), None, b["positive_labels"], None, None, b["target_padding_mask"])
    with pytest.raises(NotImplementedError, match="multi-positive"):
        frl.CE()(torch.randn(B, L, D), None, batch(gen, 2)["positive_labels"], None, None,
                 batch(gen, 2)["target_padding_mask"])


@pytest.mark.parametrize("loss", [frl.CESampled(), frl.BCESampled()], ids=["CESampled", "BCESampled"])
def test_sampled_bad_labels_are_named_errors(gen: torch.Generator, loss: torch.nn.Module) -> None:
    """A shared pool used to be gathered before any check: float ids, ids past the catalogue and a [B', L, N] pool
    of another batch size were raw IndexError/RuntimeError (a device assert on CUDA). A padded target holding the
    padding id NI (outside [0, NI)) stays fine: only real targets are checked."""
    loss.logits_callback = sasrec(rl.CE()).get_logits
    b = batch(gen)
    pos, mask = b["positive_labels"], b["target_padding_mask"]
    assert (pos[~mask] == NI).all() and (~mask).any()
    hidden = torch.randn(B, L, D, generator=gen)
    assert torch.isfinite(loss(hidden, None, pos, torch.tensor([1, 2, -100]), None, mask))
    cases = [(pos, torch.tensor([1.0, 2.0]), TypeError, "negative_labels must be an integer tensor"),
             (pos, torch.tensor([1, NI + 1, -100]), ValueError, rf"negative_labels has item ids \[{NI + 1}\] outside"),
             (pos, torch.zeros(B + 1, L, 4, dtype=torch.long), ValueError, r"\[N\], \[B, N\] or \[B, L, N\]"),
             (pos.masked_fill(mask, NI + 2), torch.tensor([1, 2]), ValueError, "positive_labels has item ids")]
    for labels, neg, error, match in cases:
        with pytest.raises(error, match=match):
            loss(hidden, None, labels, neg, None, mask)


class _ItemIds:
    """The smallest FeaturesReaderProtocol: the item tower's only feature is the item id."""

    feature_names = ["item_id"]

    def __getitem__(self, key: str) -> torch.Tensor:
        return torch.arange(NI)


@pytest.mark.parametrize("name", ["CE", "CESampled"])
def test_two_tower_reads_the_item_towers_table(gen: torch.Generator, name: str) -> None:
    """A TwoTower's body has an embedder too: the adapter used to take its raw item embeddings as the table
    instead of the item tower's output that TwoTower.get_logits scores (a different loss, silently)."""
    from replay.nn.sequential import TwoTower

    ours, theirs = getattr(frl, name)(ignore_index=NI), getattr(rl, name)(ignore_index=NI)
    base = TwoTower.from_params(schema(), _ItemIds(), embedding_dim=D, num_heads=1, num_blocks=1,
                                max_sequence_length=L, dropout=0.0)
    model = TwoTower(body=base.body, loss=theirs)
    ours.logits_callback = model.get_logits
    b = batch(gen)
    hidden = torch.randn(B, L, D, generator=gen, requires_grad=True)
    neg = negatives(gen, (7,), b["positive_labels"]) if name == "CESampled" else None

    def run(loss: torch.nn.Module) -> torch.Tensor:
        return loss(hidden, b["feature_tensors"], b["positive_labels"], neg, b["padding_mask"],
                    b["target_padding_mask"])

    assert_same(run(ours), run(theirs), [hidden, *model.body.item_tower.parameters()])


@pytest.mark.parametrize("num_positives", [1, 3])
def test_login_ce_with_a_cardinality_below_the_table(gen: torch.Generator, num_positives: int) -> None:
    """RePlay's LogInCE(cardinality) takes arange(cardinality) as negatives and scores positives from the whole
    table; ours cut the table to ``cardinality`` rows, so positives past it were dropped rows (a different
    loss, silently) — and, once the core refused such a pos_idx, an error."""
    compare(frl.LogInCE(NI - 5), rl.LogInCE(NI - 5), gen, num_positives=num_positives)
