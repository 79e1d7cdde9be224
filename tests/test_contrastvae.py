"""ContrastVAE and SASRec: masks, loss terms through fastrecloss, training, checkpoint/resume."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastrecloss.recsys import cvae_train
from fastrecloss.recsys.models.contrastvae import (
    ContrastVAE,
    EncoderConfig,
    FastDropout,
    alpha_prior,
    attention_mask,
    gaussian_kl,
    kl_weight,
    next_item_loss,
    nt_xent,
    recon_scale,
)
from fastrecloss.recsys.models.sasrec import SASRec
from fastrecloss.recsys.seqdata import SequenceBatcher

NUM_ITEMS = 40


def _cfg(**kw) -> EncoderConfig:
    base = dict(num_items=NUM_ITEMS, hidden=16, layers=1, heads=2, hidden_dropout=0.3, attn_dropout=0.3, max_len=12)
    base.update(kw)
    return EncoderConfig(**base)


def _batch(B: int = 5, L: int = 7, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Left-padded items, valid, targets, negatives with varied lengths (one full row)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    valid = torch.arange(L)[None, :] >= (L - lengths)[:, None]
    items = torch.randint(1, NUM_ITEMS + 1, (B, L), generator=g) * valid
    targets = torch.randint(1, NUM_ITEMS + 1, (B, L), generator=g) * valid
    negs = torch.randint(1, NUM_ITEMS + 1, (B, L), generator=g) * valid
    return items, valid, targets, negs


def _loss(model: ContrastVAE, items, valid, targets, negs, seed: int = 7, step: int = 100, **kw) -> dict:
    torch.manual_seed(seed)
    aug = dict(aug_items=items, aug_valid=valid) if model.aug == "da" else {}
    out = model(items, valid, **aug)
    return model.loss_terms(out, targets, negs, valid, step, nce_weight=0.3, kl_cap=0.2, anneal_steps=1000, **kw)


# ----------------------------------------------------------------------------------------------
# masks and padding


def test_attention_mask() -> None:
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    m = attention_mask(valid)[:, 0]
    assert m.shape == (2, 4, 4)
    assert not (m & ~torch.ones(4, 4, dtype=torch.bool).tril()).any()  # causal
    assert m[0, 2:, :2].sum() == 0  # real queries never see padding keys
    assert torch.equal(m[0, :2, :2], torch.eye(2, dtype=torch.bool))  # a padding query sees only itself
    assert torch.equal(m[1], torch.ones(4, 4, dtype=torch.bool).tril())


def test_published_attention_mask() -> None:
    """'published': a padding query attends to its whole row, a real query as before (causal, real keys)."""
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    m, masked = attention_mask(valid, "published")[:, 0], attention_mask(valid)[:, 0]
    assert m[0, :2].all()  # padding queries: every key, also the later real positions
    assert torch.equal(m[:, 2:], masked[:, 2:]) and torch.equal(m[1], masked[1])
    # the published additive mask: (1 - key_real·causal)·−10000; a padding query's row is −10000 everywhere
    additive = (1.0 - (valid[:, None, :] & torch.ones(4, 4, dtype=torch.bool).tril()).float()) * -10000.0
    s = torch.randn(2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close((s + additive).softmax(-1), s.masked_fill(~m, -math.inf).softmax(-1))
    with pytest.raises(ValueError, match="padding"):
        attention_mask(valid, "both")


def test_published_padding_loss_terms() -> None:
    """'published' adds the batch's padding positions to the KL and the NT-Xent sum, nothing else."""
    items, valid, targets, negs = _batch()
    models = {}
    for padding in ("masked", "published"):
        torch.manual_seed(0)
        models[padding] = ContrastVAE(_cfg(), "va", padding=padding)
    a = _loss(models["masked"], items, valid, targets, negs)
    b = _loss(models["published"], items, valid, targets, negs)
    torch.testing.assert_close(a["recon"], b["recon"], rtol=0, atol=0)  # real positions never see padding
    assert not torch.isclose(a["kl"], b["kl"]) and not torch.isclose(a["nce"], b["nce"])
    torch.manual_seed(7)
    out = models["published"](items, valid)
    everywhere = torch.ones(2 * items.shape[0], items.shape[1], dtype=torch.bool)
    torch.testing.assert_close(b["kl"], gaussian_kl(out.mu, out.logvar, everywhere, items.shape[0] * 12))
    torch.testing.assert_close(b["nce"], nt_xent(out.z[:5].sum(1), out.z[5:].sum(1)))
    full = torch.ones_like(valid)  # no padding: both modes agree
    filled = [torch.where(valid, x, 1) for x in (items, targets, negs)]
    a, b = (_loss(models[p], filled[0], full, *filled[1:]) for p in ("masked", "published"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="padding"):
        ContrastVAE(_cfg(), "va", padding="none")


@pytest.mark.parametrize("aug", ["va", "ma", "da"])
def test_padding_ids_change_nothing(aug: str) -> None:
    """Padded positions' item ids (and targets/negatives) leak into no output, loss or score."""
    torch.manual_seed(0)
    model = ContrastVAE(_cfg(mask_token=aug == "da"), aug)
    items, valid, targets, negs = _batch()
    noise = torch.randint(1, NUM_ITEMS + 1, items.shape)
    items2 = torch.where(valid, items, noise)
    targets2 = torch.where(valid, targets, noise.flip(0))
    negs2 = torch.where(valid, negs, noise.flip(1))
    for recon in ("bce", "softmax_ce"):
        a = _loss(model, items, valid, targets, negs, recon=recon)
        b = _loss(model, items2, valid, targets2, negs2, recon=recon)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    model.eval()
    outs = []
    for x in (items, items2):
        torch.manual_seed(1)  # view 2 of 'va' draws ε even in eval mode
        outs.append(model(x, valid, x, valid))
    out_a, out_b = outs
    for name in ("mu", "logvar", "z", "hidden"):
        va = valid.repeat(2, 1)
        assert torch.equal(getattr(out_a, name)[va], getattr(out_b, name)[va])
    assert torch.equal(model.user_vectors(items, valid), model.user_vectors(items2, valid))


def test_per_batch_padding_equals_padding_to_max_len() -> None:
    """Positions count from the end: padding a batch further changes no real output (eval mode)."""
    torch.manual_seed(0)
    model = ContrastVAE(_cfg(), "va").eval()
    items, valid, _, _ = _batch(L=6)
    extra = 12 - 6
    items_long = F.pad(items, (extra, 0))
    valid_long = F.pad(valid, (extra, 0))
    short, long = model(items, valid), model(items_long, valid_long)
    # view 1 (z = μ + σ) is deterministic; view 2 draws ε over the padded shape
    for name in ("mu", "logvar", "hidden"):
        torch.testing.assert_close(getattr(short, name)[:5][valid], getattr(long, name)[:5][valid_long])
    torch.testing.assert_close(model.user_vectors(items, valid), model.user_vectors(items_long, valid_long))
    with pytest.raises(ValueError, match="max_len"):
        model(F.pad(items, (13, 0)), F.pad(valid, (13, 0)))


def test_shapes_and_last_only() -> None:
    torch.manual_seed(0)
    model = ContrastVAE(_cfg(layers=2), "va").eval()
    items, valid, _, _ = _batch(B=4, L=6)
    out = model(items, valid)
    for name in ("mu", "logvar", "z", "hidden"):
        assert getattr(out, name).shape == (8, 6, 16)
    user = model.user_vectors(items, valid)
    assert user.shape == (4, 16)
    torch.testing.assert_close(user, out.hidden[:4, -1])  # view 1 is z = μ + σ, as at prediction time
    assert model.scores(user).shape == (4, NUM_ITEMS)


def test_sasrec_padding_and_shapes() -> None:
    torch.manual_seed(0)
    model = SASRec(_cfg(layers=2))
    items, valid, targets, negs = _batch()
    items2 = torch.where(valid, items, torch.randint(1, NUM_ITEMS + 1, items.shape))
    losses = []
    for x in (items, items2):
        torch.manual_seed(3)
        losses.append(model.loss_terms(model(x, valid), targets, negs, valid)["loss"])
    assert torch.equal(losses[0], losses[1])
    model.eval()
    user = model.user_vectors(items, valid)
    torch.testing.assert_close(user, model(items, valid)[:, -1])
    assert torch.equal(user, model.user_vectors(items2, valid))
    assert model.scores(user).shape == (5, NUM_ITEMS)


# ----------------------------------------------------------------------------------------------
# loss terms


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_nt_xent_equals_naive(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 9, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, 9, dtype=torch.float64, generator=g, requires_grad=True)

    def naive(a, b, tau=0.5):  # SimCLR: 2B×2B cosine similarities, self excluded, partner is the label
        z = F.normalize(torch.cat([a, b]), dim=1)
        s = (z @ z.T / tau).masked_fill(torch.eye(12, dtype=torch.bool), -math.inf)
        return F.cross_entropy(s, torch.cat([torch.arange(6, 12), torch.arange(6)]))

    got = nt_xent(a, b, 0.5, backend=backend)
    ga = torch.autograd.grad(got, (a, b))
    want = naive(a, b)
    wa = torch.autograd.grad(want, (a, b))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for x, y in zip(ga, wa):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="both have shape"):
        nt_xent(a, b[:5])


def test_nt_xent_triton_matches_naive_fp32() -> None:
    """The fused kernels (interpreter on CPU) compute in fp32: within SPEC §8's fp32 tolerance."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 9, generator=g, requires_grad=True)
    b = torch.randn(6, 9, generator=g, requires_grad=True)
    got = nt_xent(a, b, 0.5, backend="triton")
    grads = torch.autograd.grad(got, (a, b))
    a64, b64 = (x.detach().double().requires_grad_() for x in (a, b))
    want = nt_xent(a64, b64, 0.5, backend="reference")
    wants = torch.autograd.grad(want, (a64, b64))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for x, y in zip(grads, wants):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-6)


def test_next_item_losses() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(NUM_ITEMS + 2, 8, generator=g, dtype=torch.float64)  # + padding row + mask row
    hidden = torch.randn(10, 8, generator=g, dtype=torch.float64)
    targets = torch.randint(1, NUM_ITEMS + 1, (10,), generator=g)
    negs = torch.randint(1, NUM_ITEMS + 1, (10,), generator=g)
    weight = (torch.arange(10) % 3 != 0).double()
    want = (F.softplus(-(hidden * table[targets]).sum(1)) + F.softplus((hidden * table[negs]).sum(1)))
    got = next_item_loss(hidden, table, targets, negs, weight, recon="bce", num_items=NUM_ITEMS, backend="torch")
    torch.testing.assert_close(got, (want * weight).sum() / weight.sum())
    logits = hidden @ table[1:NUM_ITEMS + 1].T  # catalogue 1..num_items: no padding, no mask token
    want = F.cross_entropy(logits, targets - 1, reduction="none")
    got = next_item_loss(hidden, table, targets, None, weight, recon="softmax_ce", num_items=NUM_ITEMS,
                         backend="torch")
    torch.testing.assert_close(got, (want * weight).sum() / weight.sum())
    with pytest.raises(ValueError, match="needs negatives"):
        next_item_loss(hidden, table, targets, None, weight, recon="bce")


def test_gaussian_kl_over_real_positions() -> None:
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    valid = torch.rand(3, 4, generator=g) > 0.4
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    want = torch.distributions.kl_divergence(q, p).sum(-1)[valid].sum() / 7.0
    torch.testing.assert_close(gaussian_kl(mu, logvar, valid, 7.0), want)


def test_recon_scale_weighs_every_position_the_same() -> None:
    valid = torch.tensor([[False, True, True], [True, True, True]])
    assert recon_scale(valid, None) == 1.0
    assert float(recon_scale(valid, 2.5)) == pytest.approx(2.0)
    # the batch mean times the scale is the sum over positions / the epoch's mean positions per batch
    torch.manual_seed(0)
    model = ContrastVAE(_cfg(hidden_dropout=0.0, attn_dropout=0.0), "ma", reparam_dropout=0.0)
    items, valid, targets, negs = _batch()
    plain = _loss(model, items, valid, targets, negs)
    scaled = _loss(model, items, valid, targets, negs, recon_scale=recon_scale(valid, 10.0))
    torch.testing.assert_close(scaled["recon"], plain["recon"] * valid.sum() / 10.0)
    torch.testing.assert_close(scaled["loss"] - scaled["recon"], plain["loss"] - plain["recon"])
    cfg = _cfg(hidden_dropout=0.0, attn_dropout=0.0)
    sas = SASRec(cfg)
    hidden = sas(items, valid)
    a = sas.loss_terms(hidden, targets, negs, valid)
    b = sas.loss_terms(hidden, targets, negs, valid, recon_scale=0.5)
    torch.testing.assert_close(b["loss"], 0.5 * a["loss"])


def test_kl_annealing() -> None:
    assert kl_weight(0, 0.2, 1000) == 0.0
    assert kl_weight(100, 0.2, 1000) == pytest.approx(0.1)
    assert kl_weight(5000, 0.2, 1000) == 0.2


def test_alpha_prior_term() -> None:
    alpha = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    c1, c2, c3 = 1.161451241083230, -1.502041176441722, 0.586299206427007
    for a in alpha.tolist():
        want = -(0.5 * math.log(a) + c1 * a + c2 * a**2 + c3 * a**3)
        assert float(alpha_prior(torch.tensor(a, dtype=torch.float64))) == pytest.approx(want, rel=1e-12)
    values = torch.stack([alpha_prior(a) for a in torch.linspace(0.05, 0.99, 50, dtype=torch.float64)])
    assert (values.diff() < 0).all()  # the prior favours a larger α on (0, 1)
    torch.manual_seed(0)
    model = ContrastVAE(_cfg(), "va")
    assert float(model.alpha.detach()) == pytest.approx(0.5)
    terms = _loss(model, *_batch())
    assert float(terms["alpha_prior"].detach()) == pytest.approx(float(alpha_prior(torch.tensor(0.5))))
    terms["loss"].backward()
    assert model.alpha_logit.grad is not None and model.alpha_logit.grad != 0
    ma = ContrastVAE(_cfg(), "ma")
    assert not ma.alpha_logit.requires_grad and "alpha_prior" not in _loss(ma, *_batch())


def test_variational_reparameterisation_statistics() -> None:
    torch.manual_seed(0)
    model = ContrastVAE(_cfg(), "va")
    with torch.no_grad():
        model.alpha_logit.fill_(math.log(0.3 / 0.7))  # α = 0.3
    mu = torch.tensor([[-1.0, 0.5, 2.0]]).expand(40_000, 3)
    logvar = torch.tensor([[0.0, -2.0, 1.0]]).expand(40_000, 3)
    z = model.sample_view2(mu, logvar).detach()
    sigma = (0.5 * logvar[0]).exp()
    torch.testing.assert_close(z.mean(0), mu[0], atol=4 * 0.3 * sigma.max() / 200, rtol=0)
    torch.testing.assert_close(z.std(0), 0.3 * sigma, rtol=0.02, atol=0)


def test_model_augmentation_reparameterisation() -> None:
    torch.manual_seed(0)
    model = ContrastVAE(_cfg(), "ma", reparam_dropout=0.25)
    mu, logvar = torch.zeros(20_000, 2), torch.zeros(20_000, 2)  # σ = 1
    z = model.sample_view2(mu, logvar)
    values = torch.unique(z)
    assert values.numel() == 2 and values[0] == 0 and float(values[1]) == pytest.approx(1 / 0.75, rel=1e-4)
    assert float((z == 0).float().mean()) == pytest.approx(0.25, abs=0.02)


def test_fast_dropout() -> None:
    torch.manual_seed(0)
    drop = FastDropout(0.3)
    x = torch.ones(200_000)
    y = drop(x)
    assert float((y == 0).float().mean()) == pytest.approx(0.3, abs=0.005)
    assert float(y.mean()) == pytest.approx(1.0, abs=0.01)
    assert torch.equal(drop.eval()(x), x) and torch.equal(FastDropout(0.0).train()(x), x)
    x = torch.randn(50, requires_grad=True)
    y = FastDropout(0.5).train()(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y.detach() != 0).float() * 2)
    with pytest.raises(ValueError, match="dropout"):
        FastDropout(1.0)


def test_data_augmentation_view_is_used() -> None:
    torch.manual_seed(0)
    model = ContrastVAE(_cfg(mask_token=True), "da").eval()
    items, valid, _, _ = _batch()
    aug = torch.where(valid, (items % NUM_ITEMS) + 1, items)
    a, b = model(items, valid, items, valid), model(items, valid, aug, valid)
    assert torch.equal(a.z[:5], b.z[:5]) and not torch.allclose(a.z[5:], b.z[5:])
    with pytest.raises(ValueError, match="aug_items"):
        model(items, valid)
    with pytest.raises(ValueError, match="mask_token"):
        ContrastVAE(_cfg(), "da")


# ----------------------------------------------------------------------------------------------
# training


def _seqs(num_users: int = 60, seed: int = 0) -> list[list[int]]:
    """Tiny sequences with structure: each user walks up the catalogue from a random start."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_users):
        n, start = int(torch.randint(4, 10, (1,), generator=g)), int(torch.randint(0, NUM_ITEMS, (1,), generator=g))
        out.append([(start + k) % NUM_ITEMS + 1 for k in range(n)])
    return out


@pytest.mark.parametrize("name", ["va", "ma", "da", "sasrec"])
def test_a_few_steps_reduce_the_loss(name: str) -> None:
    torch.manual_seed(0)
    cfg = _cfg(mask_token=name == "da", hidden_dropout=0.1, attn_dropout=0.1)
    model = SASRec(cfg) if name == "sasrec" else ContrastVAE(cfg, name)
    batcher = SequenceBatcher(_seqs(), NUM_ITEMS, cfg.max_len, 30, mask_id=cfg.mask_id)
    batches = list(batcher.epoch(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def total(batch, seed: int = 11):
        torch.manual_seed(seed)
        if name == "sasrec":
            return model.loss_terms(model(batch.items, batch.valid), batch.targets, batch.negatives, batch.valid)
        out = model(batch.items, batch.valid, batch.aug_items, batch.aug_valid)
        return model.loss_terms(out, batch.targets, batch.negatives, batch.valid, 0, nce_weight=0.3, kl_cap=0.2,
                                anneal_steps=100)

    before = sum(float(total(b)["loss"].detach()) for b in batches)
    for step in range(30):
        loss = total(batches[step % len(batches)], seed=step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sum(float(total(b)["loss"].detach()) for b in batches)
    assert after < 0.8 * before


def _args(tmp_path, **kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cvae_train.add_arguments(parser, kw.pop("model", "contrastvae"))
    argv = ["--out", str(tmp_path), "--hidden", "16", "--heads", "2", "--max-len", "10", "--batch-size", "128",
            "--no-progress", "--threads", "1", "--patience", "50"]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return parser.parse_args(argv)


def _results(path) -> dict:
    r = json.loads((path / "results.json").read_text())
    return {"valid": r["valid"], "test": r["test"], "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"],
            "losses": [{k: v for k, v in h.items() if k not in ("train_seconds", "cpu_seconds")}
                       for h in r["history"]]}


@pytest.mark.parametrize("model", ["contrastvae", "sasrec"])
def test_resume_equals_uninterrupted(tmp_path, model: str, capsys) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    assert cvae_train.run(_args(full, model=model, epochs=3)) == 0
    assert cvae_train.run(_args(part, model=model, epochs=2)) == 0
    assert cvae_train.run(_args(part, model=model, epochs=3, resume=True)) == 0
    a, b = _results(full), _results(part)
    assert a["epochs_run"] == 3 and a == b
    assert "resumed" in capsys.readouterr().out


def test_max_minutes_stops_and_resume_finishes(tmp_path) -> None:
    out = tmp_path / "run"
    assert cvae_train.run(_args(out, epochs=2, max_minutes=0)) == 0
    assert json.loads((out / "results.json").read_text())["status"] == "budget"
    assert cvae_train.run(_args(out, epochs=1)) == 0
    assert cvae_train.run(_args(out, epochs=2, max_minutes=1e-9, resume=True)) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "budget" and r["epochs_run"] == 1
    assert cvae_train.run(_args(out, epochs=2, resume=True)) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "finished" and r["epochs_run"] == 2
    assert r["test"]["recall@20"] > 0


def test_presets_and_flags() -> None:
    parser = argparse.ArgumentParser()
    cvae_train.add_arguments(parser, "contrastvae")
    hp = cvae_train.resolve(parser.parse_args(["--data", "x/Beauty.txt"]), 10)
    assert (hp["preset"], hp["aug"], hp["nce_weight"], hp["max_len"], hp["attn_dropout"]) == ("beauty", "ma", 0.6, 50,
                                                                                              0.0)
    hp = cvae_train.resolve(parser.parse_args(["--data", "Office_Products.txt", "--aug", "da", "--kl-cap", "0.1"]), 10)
    assert (hp["preset"], hp["aug"], hp["kl_cap"], hp["anneal_steps"]) == ("office", "da", 0.1, 20_000)
    assert hp["recon_norm"] == "epoch"
    assert cvae_train.resolve(parser.parse_args(["--recon-norm", "batch"]), 10)["recon_norm"] == "batch"
    assert (hp["padding"], hp["pad_to_max_len"]) == ("masked", False)
    hp = cvae_train.resolve(parser.parse_args(["--padding", "published", "--pad-to-max-len"]), 10)
    assert (hp["padding"], hp["pad_to_max_len"]) == ("published", True)
    assert cvae_train.build("contrastvae", hp).model.padding == "published"
    parser = argparse.ArgumentParser()
    cvae_train.add_arguments(parser, "sasrec")
    hp = cvae_train.resolve(parser.parse_args(["--data", "Beauty.txt"]), 10)
    assert hp["max_len"] == 50 and "aug" not in hp and hp["layers"] == 2
