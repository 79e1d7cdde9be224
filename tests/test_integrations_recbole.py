"""fastrecloss.integrations.recbole against the real RecBole (no mocks): same loss, same gradients.

Every model is built by RecBole from a tiny atomic data set written here, batches come from
RecBole's own dataloaders, and the reference is the model's own ``calculate_loss``. Runs in the
second CI command (``python3 dev.py integrations``); skips only outside CI when RecBole is absent.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from integrations_util import assert_same, require

pytestmark = [pytest.mark.integrations, *(pytest.mark.filterwarnings(f"ignore::{w}") for w in
                                          ("FutureWarning", "DeprecationWarning", "UserWarning"))]

require("recbole")
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import get_model, init_seed  # noqa: E402

from fastrecloss.integrations import recbole as fr  # noqa: E402  (before RecBole's Config: the compat aliases)

N_ITEMS = 30


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 users, 5–11 distinct items each out of 30, chronological, plus one categorical item feature."""
    root = tmp_path_factory.mktemp("recbole")
    (root / "tiny").mkdir()
    rng = np.random.default_rng(0)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(40):
        for t, i in enumerate(rng.choice(N_ITEMS, size=int(rng.integers(5, 12)), replace=False)):
            lines.append(f"{u + 1}\t{i + 1}\t{t}")
    (root / "tiny" / "tiny.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\tgenre:token", *(f"{i + 1}\t{i % 4}" for i in range(N_ITEMS))]
    (root / "tiny" / "tiny.item").write_text("\n".join(items) + "\n")
    return root


def settings(root: Path, model: str, **overrides: Any) -> dict[str, Any]:
    """The config_dict of ``model`` on the tiny set."""
    sequential = model not in fr.GENERAL
    cfg = dict(data_path=str(root), checkpoint_dir=str(root / "ckpt"), train_batch_size=32, eval_batch_size=64,
               hidden_size=8, inner_size=16, n_layers=1, n_heads=1, embedding_size=8, MAX_ITEM_LIST_LENGTH=10,
               epochs=1, show_progress=False, state="ERROR", use_gpu=False, seed=0, reproducibility=True,
               loss_type="CE", load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "genre"]},
               selected_features=["genre"], worker=0,
               train_neg_sample_args=None if sequential else {"distribution": "uniform", "sample_num": 1},
               eval_args={"split": {"LS": "valid_and_test"} if sequential else {"RS": [0.8, 0.1, 0.1]},
                          "order": "TO", "mode": "full"})
    cfg.update(overrides)
    return cfg


def build(root: Path, model: str, **overrides: Any) -> tuple[Config, Any, Any, Any]:
    """(config, model, train, valid) for ``model`` on the tiny set, RecBole's pipeline end to end."""
    config = Config(model=model, dataset="tiny", config_dict=settings(root, model, **overrides))
    init_seed(0, True)
    dataset = create_dataset(config)
    train, valid, _ = data_preparation(config, dataset)
    return config, get_model(model)(config, train.dataset), train, valid


def first_batch(train: Any) -> Any:
    init_seed(1, True)
    return next(iter(train))


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def own_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return type(model).calculate_loss(model, batch)


@pytest.mark.parametrize("name", sorted(fr.SEQUENTIAL))
def test_softmax_ce_is_the_models_own_ce_loss(data_root: Path, name: str) -> None:
    _, model, train, _ = build(data_root, name)
    model.eval()  # no dropout: both forwards see the same network
    batch = first_batch(train)
    fr.use_fastrecloss(model, loss="softmax_ce", backend="torch")
    assert isinstance(model.calculate_loss, fr.FastRecLoss)
    assert_same(model.calculate_loss(batch), own_loss(model, batch), params(model))


@pytest.mark.parametrize("name", sorted(fr.GENERAL))
def test_bpr_with_the_dataloaders_negatives_is_recboles_bpr_loss(data_root: Path, name: str) -> None:
    _, model, train, _ = build(data_root, name, reg_weight=0.5)  # a regulariser big enough to be seen
    batch = first_batch(train)
    fr.use_fastrecloss(model, loss="bpr")
    assert_same(model.calculate_loss(batch), own_loss(model, batch), params(model))


def test_bpr_loss_type_sequential_model_with_interaction_negatives(data_root: Path) -> None:
    _, model, train, _ = build(data_root, "SASRec", loss_type="BPR",
                               train_neg_sample_args={"distribution": "uniform", "sample_num": 1})
    model.eval()
    batch = first_batch(train)
    fr.use_fastrecloss(model, loss="bpr", negatives="interaction")
    assert_same(model.calculate_loss(batch), own_loss(model, batch), params(model))


def _sampled_reference(model: Any, batch: Any, ids: torch.Tensor, log_q: torch.Tensor | None) -> torch.Tensor:
    """Corrected sampled softmax written out: CE over [positive, pool], accidental hits at −inf."""
    query = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    table, target = model.item_embedding.weight, batch[model.POS_ITEM_ID]
    pos = (query * table[target]).sum(-1, keepdim=True)
    neg = query @ table[ids].T
    if log_q is not None:
        pos, neg = pos - log_q[target][:, None], neg - log_q[ids][None, :]
    neg = neg.masked_fill(target[:, None] == ids[None, :], -torch.inf)
    logits = torch.cat([pos, neg], dim=1)
    return torch.nn.functional.cross_entropy(logits, torch.zeros_like(target))


@pytest.mark.parametrize("negatives", ["uniform", "popularity"])
def test_sampled_softmax_draws_the_pool_and_corrects_with_log_q(data_root: Path, negatives: str) -> None:
    _, model, train, _ = build(data_root, "SASRec")
    model.eval()
    batch = first_batch(train)
    counts = fr.count_items(train.dataset)
    assert counts.shape == (model.n_items,) and counts[0] == 0 and counts.sum() == len(train.dataset.inter_feat)
    given = train.dataset if negatives == "popularity" else None  # uniform draws take no counts
    fr.use_fastrecloss(model, loss="infonce", negatives=negatives, num_negatives=16, item_counts=given,
                       generator=torch.Generator().manual_seed(5))
    ours = model.calculate_loss(batch)
    # the same draw again, by hand
    p = torch.zeros(model.n_items, dtype=torch.float64)
    p[1:] = counts[1:].double() / counts[1:].sum() if negatives == "popularity" else 1.0 / (model.n_items - 1)
    gen = torch.Generator().manual_seed(5)
    ids = (torch.randint(1, model.n_items, (16,), generator=gen) if negatives == "uniform"
           else torch.multinomial(p, 16, replacement=True, generator=gen))
    assert (ids > 0).all()  # the padding id 0 is never a negative
    log_q = (16 * p).log().float()
    assert_same(ours, _sampled_reference(model, batch, ids, log_q), params(model))
    # without the correction it is a different loss, and equal to the uncorrected reference
    fr.use_fastrecloss(model, loss="infonce", negatives=negatives, num_negatives=16, item_counts=given,
                       generator=torch.Generator().manual_seed(5), logq_correction=False)
    plain = model.calculate_loss(batch)
    assert_same(plain, _sampled_reference(model, batch, ids, None), params(model))
    if negatives == "popularity":
        assert not torch.allclose(plain, ours)


def test_in_batch_negatives_exclude_the_rows_own_item(data_root: Path) -> None:
    _, model, train, _ = build(data_root, "GRU4Rec")
    model.eval()
    batch = first_batch(train)
    fr.use_fastrecloss(model, loss="infonce", negatives="in_batch", temperature=0.5)
    query = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    target = batch[model.POS_ITEM_ID]
    pos = model.item_embedding.weight[target]
    logits = (query @ pos.T / 0.5).masked_fill((target[:, None] == target[None, :]) & ~torch.eye(len(target),
                                                                                                   dtype=torch.bool),
                                                -torch.inf)
    ref = torch.nn.functional.cross_entropy(logits, torch.arange(len(target)))
    assert_same(model.calculate_loss(batch), ref, params(model))


def test_trains_sasrec_through_recboles_trainer_and_reloads_its_checkpoint(data_root: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(data_root)  # RecBole's Trainer creates log_tensorboard/ in the working directory
    config, model, train, valid = build(data_root, "SASRec", epochs=3, eval_step=1)
    fr.use_fastrecloss(model, loss="infonce", negatives="uniform", num_negatives=8)
    before = model.item_embedding.weight.detach().clone()
    trainer = Trainer(config, model)
    best, result = trainer.fit(train, valid, saved=True)
    assert np.isfinite(best) and set(result) >= {"recall@10", "ndcg@10"}
    assert not torch.equal(before, model.item_embedding.weight.detach())
    # RecBole 1.2.1 loads its checkpoint with a bare torch.load: on torch >= 2.6 that fails ...
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    with pytest.raises(pickle.UnpicklingError):
        trainer.evaluate(valid, load_best_model=True)
    # ... and the documented workaround (a checkpoint we wrote ourselves) makes it load
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    again = trainer.evaluate(valid, load_best_model=True)
    assert set(again) >= {"recall@10", "ndcg@10"}


def test_restore_and_errors(data_root: Path) -> None:
    _, model, train, _ = build(data_root, "SASRec")
    fr.use_fastrecloss(model, loss="softmax_ce")
    fr.restore_loss(model)
    assert model.calculate_loss.__func__ is type(model).calculate_loss
    with pytest.raises(ValueError, match="loss must be one of"):
        fr.use_fastrecloss(model, loss="hinge")
    with pytest.raises(ValueError, match="pass no negatives"):
        fr.use_fastrecloss(model, loss="softmax_ce", negatives="uniform")
    with pytest.raises(ValueError, match="item_counts"):
        fr.use_fastrecloss(model, loss="infonce", negatives="popularity")
    with pytest.raises(ValueError, match="sets weight itself"):
        fr.use_fastrecloss(model, loss="softmax_ce", weight=None)
    fr.use_fastrecloss(model, loss="bpr", negatives="interaction")
    with pytest.raises(ValueError, match="train_neg_sample_args"):
        model.calculate_loss(first_batch(train))
    with pytest.raises(ValueError, match="does not know how Linear"):
        fr.use_fastrecloss(torch.nn.Linear(2, 2))
    # a learnable τ the model does not hold would never reach RecBole's optimiser (model.parameters())
    with pytest.raises(ValueError, match="temperature is an nn.Parameter that the model does not hold"):
        fr.use_fastrecloss(model, loss="softmax_ce", temperature=torch.nn.Parameter(torch.tensor(0.5)))
    model.tau = torch.nn.Parameter(torch.tensor(0.5))
    fr.use_fastrecloss(model, loss="softmax_ce", temperature=model.tau)


def test_item_counts_the_ways_recbole_gives_them_and_alpha(data_root: Path) -> None:
    """A Dataset, its item_counter (a Counter), a numpy array and a tensor are the same counts (they used to fail
    with AttributeError unless a Dataset or a tensor); ``alpha`` is train_neg_sample_args' alpha, q ∝ count^alpha."""
    _, model, train, _ = build(data_root, "SASRec")
    counts = fr.count_items(train.dataset)
    probs = {}
    for name, given in (("dataset", train.dataset), ("item_counter", train.dataset.item_counter),
                        ("numpy", counts.numpy()), ("tensor", counts)):
        fr.use_fastrecloss(model, loss="infonce", negatives="popularity", num_negatives=4, item_counts=given)
        probs[name] = model.calculate_loss.sampler.probs
    assert all(torch.equal(p, probs["tensor"]) for p in probs.values())
    fr.use_fastrecloss(model, loss="infonce", negatives="popularity", num_negatives=4, item_counts=train.dataset,
                       alpha=0.75)
    want = counts.double().pow(0.75)
    want[0] = 0.0
    torch.testing.assert_close(model.calculate_loss.sampler.probs, want / want.sum())
    with pytest.raises(ValueError, match=r"item_counts must have one entry per item id, shape \[n_items\]"):
        fr.use_fastrecloss(model, loss="infonce", negatives="popularity", item_counts=counts[:-1])
    with pytest.raises(ValueError, match="outside the model's"):
        fr.use_fastrecloss(model, loss="infonce", negatives="popularity", item_counts={N_ITEMS + 5: 3})


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(loss="infonce", negatives="uniform", item_counts="dataset"), "negatives='uniform' draws ids 1..n_items-1"),
    (dict(loss="bpr", negatives="interaction", item_counts="dataset"), "negatives='interaction' takes the dataloader"),
    (dict(loss="softmax_ce", item_counts="dataset"), "negatives=None scores the whole catalogue"),
    (dict(loss="infonce", negatives="uniform", alpha=0.5), "alpha .* is for negatives='popularity'"),
    (dict(loss="infonce", negatives="interaction", logq_correction=True), "logq_correction=True needs negatives"),
    (dict(loss="infonce", negatives="in_batch", logq_correction=True), "in_batch' needs item_counts"),
], ids=["uniform-counts", "interaction-counts", "softmax-counts", "uniform-alpha", "interaction-logq",
        "in-batch-logq"])
def test_options_that_would_be_ignored_are_errors(data_root: Path, kwargs: dict[str, Any], match: str) -> None:
    """item_counts / alpha / logq_correction=True where the chosen negatives do not use them used to be ignored
    silently (uniform with counts drew every id alike; the dataloader's negatives got no logQ)."""
    _, model, train, _ = build(data_root, "SASRec")
    if kwargs.get("item_counts") == "dataset":
        kwargs = dict(kwargs, item_counts=train.dataset)
    with pytest.raises(ValueError, match=match):
        fr.use_fastrecloss(model, **kwargs)


@pytest.mark.parametrize("negatives", ["popularity", "in_batch"])
def test_bert4rec_padded_mask_slots_with_log_q(data_root: Path, negatives: str) -> None:
    """BERT4Rec's unused mask slots (target = the padding id 0, weight 0) have logQ −inf: the sampled loss was NaN
    (+inf positive score in an ignored row) and the in-batch logQ raised on item 0's zero count."""
    _, model, train, _ = build(data_root, "BERT4Rec", mask_ratio=0.3)
    model.eval()
    batch = first_batch(train)
    r = fr.SEQUENTIAL["BERT4Rec"](model, batch)
    real = r.weight > 0
    assert (~real).any() and real.any()
    counts = fr.count_items(train.dataset).double()
    fr.use_fastrecloss(model, loss="infonce", negatives=negatives, num_negatives=8, item_counts=train.dataset,
                       generator=torch.Generator().manual_seed(5))
    ours = model.calculate_loss(batch)
    q, target = r.query[real], r.target[real]
    if negatives == "popularity":
        p = counts / counts.sum()
        ids = torch.multinomial(p, 8, replacement=True, generator=torch.Generator().manual_seed(5))
        log_q = (8 * p).log()
        pos = (q * r.table[target]).sum(-1, keepdim=True) - log_q[target][:, None]
        neg = (q @ r.table[ids].T - log_q[ids]).masked_fill(target[:, None] == ids, -torch.inf)
        logits, label = torch.cat([pos, neg], 1), torch.zeros_like(target)
    else:  # in-batch over the real rows: logQ = log(R_real · p_j), the own column is the positive
        log_q = (counts[target] / counts.sum() * len(target)).log()
        hits = (target[:, None] == target[None, :]) & ~torch.eye(len(target), dtype=torch.bool)
        logits, label = (q @ r.table[target].T - log_q).masked_fill(hits, -torch.inf), torch.arange(len(target))
    ref = torch.nn.functional.cross_entropy(logits.float(), label)
    assert torch.isfinite(ours)
    assert_same(ours, ref, params(model))


def test_run_recbole_with_our_loss_is_recboles_run_recbole(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RecBole's run_recbole builds the model by name (no hook for use_fastrecloss); ours does the same steps with
    the loss replaced: with softmax_ce (= the model's CE) it reproduces RecBole's result."""
    from recbole.quick_start import run_recbole

    monkeypatch.chdir(data_root)  # log/ and log_tensorboard/ go to the working directory
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RecBole's own evaluate(load_best_model=True)
    cfg = settings(data_root, "SASRec", epochs=2, eval_step=1)
    theirs = run_recbole(model="SASRec", dataset="tiny", config_dict=cfg)
    ours = fr.run_recbole("SASRec", "tiny", config_dict=cfg, loss="softmax_ce", backend="torch")
    assert set(ours) == set(theirs) and ours["test_result"]
    for key in ("best_valid_result", "test_result"):
        assert dict(ours[key]) == pytest.approx(dict(theirs[key]), abs=1e-4)
    sampled = fr.run_recbole("SASRec", "tiny", config_dict=cfg, loss="infonce", negatives="popularity",
                             num_negatives=8)  # item_counts: the training split's, by default
    assert sampled["test_result"] != ours["test_result"]


def test_sample_num_groups_the_dataloaders_negatives(data_root: Path) -> None:
    """train_neg_sample_args' sample_num K: RecBole repeats each row K times with one negative each. Grouped,
    BPR is still RecBole's own loss (a mean is a mean) and InfoNCE is one (K+1)-way softmax per interaction."""
    _, model, train, _ = build(data_root, "BPR", train_neg_sample_args={"distribution": "uniform", "sample_num": 3})
    batch = first_batch(train)
    fr.use_fastrecloss(model, loss="bpr", sample_num=3)
    assert_same(model.calculate_loss(batch), own_loss(model, batch), params(model))
    fr.use_fastrecloss(model, loss="infonce", sample_num=3)
    b = len(batch[model.USER_ID]) // 3
    user, pos = batch[model.USER_ID][:b], batch[model.ITEM_ID][:b]
    neg = batch[model.NEG_ITEM_ID].view(3, b).T
    assert (batch[model.USER_ID].view(3, b) == user).all() and not (neg == neg[:, :1]).all()
    q, table = model.get_user_embedding(user), model.item_embedding.weight
    logits = torch.cat([(q * table[pos]).sum(-1, keepdim=True), (q[:, None] * table[neg]).sum(-1)], 1)
    logits[:, 1:] = logits[:, 1:].masked_fill(neg == pos[:, None], -torch.inf)
    ref = torch.nn.functional.cross_entropy(logits, torch.zeros(b, dtype=torch.long))
    assert_same(model.calculate_loss(batch), ref, params(model))
    fr.use_fastrecloss(model, loss="infonce", sample_num=2)
    with pytest.raises(ValueError, match="sample_num = 2"):
        model.calculate_loss(batch)
    with pytest.raises(ValueError, match="sample_num groups the dataloader's negatives"):
        fr.use_fastrecloss(model, loss="infonce", negatives="uniform", sample_num=3)


def test_run_recbole_takes_sample_num_and_counts_from_its_config(data_root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(data_root)
    seen: list[dict[str, Any]] = []

    def spy(model: torch.nn.Module, loss: str, **kwargs: Any) -> torch.nn.Module:
        seen.append(kwargs)
        return use(model, loss, **kwargs)

    use = fr.use_fastrecloss
    monkeypatch.setattr(fr, "use_fastrecloss", spy)
    cfg = settings(data_root, "BPR", train_neg_sample_args={"distribution": "uniform", "sample_num": 3})
    result = fr.run_recbole("BPR", "tiny", config_dict=cfg, saved=False, loss="infonce")
    fr.run_recbole("BPR", "tiny", config_dict=cfg, saved=False, loss="infonce", negatives="popularity")
    assert result["test_result"] and seen[0] == {"sample_num": 3}
    assert set(seen[1]) == {"negatives", "item_counts"} and seen[1]["item_counts"].item_num == N_ITEMS + 1
