"""MF model routing, training, checkpoint/resume and the ``train mf`` command's errors."""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF

from fastrecloss.recsys import mf_train
from fastrecloss.recsys.data import ratio_split, synthetic
from fastrecloss.recsys.metrics import full_ranking
from fastrecloss.recsys.mf_train import MFConfig, train_mf
from fastrecloss.recsys.models import MF
from fastrecloss.recsys.models.mf import LAYOUTS, LOSSES, MFBatch, check_loss, resolve_layout
from fastrecloss.recsys.sampling import NegativeSampler, UserItemSet

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _model(seed: int = 0) -> MF:
    torch.manual_seed(seed)
    return MF(12, 30, 8, init_std=0.5)


def _batch() -> MFBatch:
    g = torch.Generator().manual_seed(1)
    return MFBatch(torch.randint(0, 12, (16,), generator=g), torch.randint(0, 30, (16,), generator=g))


def _loss_and_grads(model: MF, loss: str, layout: str, backend: str, **kw) -> tuple[torch.Tensor, ...]:
    model.zero_grad()
    sampler = NegativeSampler(30, "uniform", generator=torch.Generator().manual_seed(7))
    value = model.loss(_batch(), loss, layout, sampler=sampler, num_negatives=6, backend=backend, **kw)
    value.backward()
    return value.detach(), model.user.weight.grad.clone(), model.item.weight.grad.clone()


COMBOS = [(loss, layout) for loss in LOSSES for layout in LAYOUTS if (loss == "softmax_ce") == (layout == "full")
          or (loss != "softmax_ce" and layout == "full")]


@pytest.mark.parametrize("loss, layout", COMBOS)
def test_backends_agree_for_every_loss_and_layout(loss: str, layout: str) -> None:
    model = _model()
    kw = {"temperature": 0.7, "log_q_correction": layout != "full", "item_counts": torch.arange(1, 31).numpy()}
    ref = _loss_and_grads(model, loss, layout, "reference", **kw)
    fast = _loss_and_grads(model, loss, layout, "torch", **kw)
    assert torch.isfinite(ref[0])
    for a, b in zip(ref, fast):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ref[1].abs().sum() > 0 and ref[2].abs().sum() > 0  # both tables get gradients


def test_layouts_compute_the_same_thing() -> None:
    model = _model()
    # per_row and indexed draw the same negatives from the same seed: same loss and gradients.
    for loss in ("mine_plus", "bpr", "bce"):
        a = _loss_and_grads(model, loss, "per_row", "torch")
        b = _loss_and_grads(model, loss, "indexed", "torch")
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # InfoNCE over the whole catalogue (positive once in the denominator) is softmax CE.
    a = _loss_and_grads(model, "infonce", "full", "torch", temperature=0.5)
    b = _loss_and_grads(model, "softmax_ce", "full", "torch", temperature=0.5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_shared_bpr_by_hand() -> None:
    model = _model()
    users, items = _batch()
    sampler = NegativeSampler(30, "uniform", generator=torch.Generator().manual_seed(3))
    got = model.loss(MFBatch(users, items), "bpr", "shared", sampler=sampler, num_negatives=10, temperature=2.0)
    ids, _ = NegativeSampler(30, "uniform", generator=torch.Generator().manual_seed(3)).sample_shared(10)
    q, V = model.user.weight[users], model.item.weight
    s_pos = (q * V[items]).sum(1) / 2.0
    s_neg = q @ V[ids].T / 2.0
    keep = ids[None, :] != items[:, None]  # accidental hits are masked
    rows = (TF.softplus(s_neg - s_pos[:, None]) * keep).sum(1) / keep.sum(1)
    torch.testing.assert_close(got, rows.mean())


def test_exclude_masks_known_items_in_batch() -> None:
    model = _model()
    users = torch.tensor([0, 1, 2])
    items = torch.tensor([5, 6, 7])
    known = UserItemSet(torch.tensor([0, 0, 1, 2]), torch.tensor([5, 6, 6, 7]), 30)  # item 6 known to user 0
    got = model.loss(MFBatch(users, items), "dcl", "in_batch", exclude=known)
    q, p = model.user.weight[users], model.item.weight[items]
    s = q @ p.T
    s = s.masked_fill(torch.tensor([[True, True, False], [False, True, False], [False, False, True]]), -torch.inf)
    expected = (-(q * p).sum(1) + torch.logsumexp(s, dim=1)).mean()
    torch.testing.assert_close(got, expected)


def test_loss_and_layout_errors() -> None:
    with pytest.raises(ValueError, match="unknown loss 'nce'"):
        check_loss("nce")
    with pytest.raises(ValueError, match="lam does not apply to bpr"):
        check_loss("bpr", {"lam": 1.2})
    with pytest.raises(ValueError, match="softmax_ce ranks against the full catalogue"):
        resolve_layout("softmax_ce", "shared", "uniform")
    with pytest.raises(ValueError, match="does not match sampler"):
        resolve_layout("bpr", "in_batch", "uniform")
    assert resolve_layout("softmax_ce", "auto", "uniform") == "full"
    assert resolve_layout("mine", "auto", "in-batch") == "in_batch"


def _small_cfg(**kw) -> MFConfig:
    base = MFConfig(data="synthetic", loss="mine_plus", layout="shared", negatives=64, dim=16, batch_size=512,
                    lr=1e-2, temperature=1.0, epochs=4, patience=10, progress=False)
    return replace(base, **kw)


def test_training_beats_popularity() -> None:
    torch.set_num_threads(1)
    split = ratio_split(synthetic(seed=0), seed=0)
    res = train_mf(_small_cfg(epochs=6), split=split)
    counts = torch.as_tensor(split.train.item_counts(), dtype=torch.float32)
    history = [a + b for a, b in zip(split.train.user_items(), split.valid.user_items())]
    pop = full_ranking(lambda u: counts.expand(len(u), -1), list(range(split.train.num_users)),
                       split.test.user_items(), history)
    assert res["test"]["ndcg@20"] > 1.3 * pop["ndcg@20"], (res["test"], pop)


def test_resume_after_interruption_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    split = ratio_split(synthetic(num_users=150, num_items=80, per_user=12, seed=1), seed=1)
    full = train_mf(_small_cfg(out=str(tmp_path / "a"), batch_size=128, epochs=4), split=split)

    calls = {"n": 0}
    original = MF.loss

    def dying_loss(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 12 + 5:  # 12 batches an epoch: killed in the middle of epoch 3
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MF, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train_mf(_small_cfg(out=str(tmp_path / "b"), batch_size=128, epochs=4), split=split)
    monkeypatch.setattr(MF, "loss", original)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["epoch"] == 1  # 2 epochs kept
    resumed = train_mf(_small_cfg(out=str(tmp_path / "b"), batch_size=128, epochs=4, resume=True), split=split)
    assert resumed["resumed_from_epoch"] == 2
    strip = lambda h: [{k: v for k, v in e.items() if k != "train_seconds"} for e in h]
    assert strip(resumed["history"]) == strip(full["history"])
    assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["test"] == full["test"]


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastrecloss train mf")
    mf_train.add_arguments(parser, "mf")
    return mf_train.run(parser.parse_args(argv))


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/file.inter"], "no such file"),
    (["--loss", "nce"], "unknown loss 'nce'"),
    (["--ks", "20", "500"], "K = 500 is larger than the catalogue"),
    (["--loss", "bpr", "--lam", "1.2"], "lam does not apply to bpr"),
    (["--resume"], "--resume needs --out"),
    (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
])
def test_cli_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["--epochs", "1", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("fastrecloss train mf: error:")


def test_cli_malformed_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "u.data"
    f.write_text("1\t2\t5\t10\n1\t3\n")
    assert _cli(["--data", str(f), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "u.data:2:" in err


def test_cli_trains_and_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "seq.txt"  # a sequence file with an item id 0
    f.write_text("".join(f"{u} " + " ".join(str((u * 7 + k) % 40) for k in range(10)) + "\n" for u in range(60)))
    out = tmp_path / "run"
    rc = _cli(["--data", str(f), "--loss", "bpr", "--sampler", "popularity", "--layout", "per_row", "--negatives",
               "8", "--epochs", "2", "--dim", "8", "--no-progress", "--out", str(out), "--ks", "5", "20"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["test"]) == {f"{m}@{k}" for m in ("recall", "ndcg", "hit", "mrr") for k in (5, 20)}
    assert res["epochs_run"] == 2 and len(res["history"]) == 2
    assert "test:" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("fastrecloss.recsys.cvae_train") is None,
                    reason="fastrecloss train needs every model's module (cvae_train not present yet)")
def test_console_command_routes_to_mf(capsys: pytest.CaptureFixture[str]) -> None:
    from fastrecloss.cli import main

    assert main(["train", "mf", "--loss", "nope", "--no-progress"]) == 2
    assert "unknown loss 'nope'" in capsys.readouterr().err


@pytest.mark.data
@pytest.mark.skipif(not (SHARED / "ml-100k" / "ml-100k.inter").exists(), reason="../shared/data/ml-100k not found")
def test_movielens_one_epoch() -> None:
    torch.set_num_threads(1)
    cfg = _small_cfg(data=str(SHARED / "ml-100k" / "ml-100k.inter"), min_rating=4.0, epochs=1, dim=32)
    res = train_mf(cfg)
    assert "942 users, 1447 items, 55375 interactions" in res["data"]
    assert res["test"]["recall@20"] > 0.05  # far above chance (~0.014) after one epoch


@pytest.mark.slow
def test_demo_comparison_quick() -> None:
    text = mf_train.demo_comparison(quick=True)
    assert "failed" not in text, text
    lines = [line.split() for line in text.splitlines() if line.strip().startswith(("reference", "torch"))]
    assert len(lines) == 2 and lines[0][1:3] == lines[1][1:3]  # equal recall@20 and ndcg@20 (4 decimals)


def test_resume_refuses_a_different_configuration(tmp_path: Path) -> None:
    split = ratio_split(synthetic(num_users=60, num_items=40, per_user=8, seed=2), seed=2)
    train_mf(_small_cfg(out=str(tmp_path), epochs=1, dim=8), split=split)
    with pytest.raises(ValueError, match="written with loss='mine_plus', now loss='bpr'"):
        train_mf(_small_cfg(out=str(tmp_path), epochs=2, dim=8, loss="bpr", resume=True), split=split)
    more = train_mf(_small_cfg(out=str(tmp_path), epochs=2, dim=8, resume=True), split=split)  # epochs may grow
    assert more["resumed_from_epoch"] == 1 and more["epochs_run"] == 2
