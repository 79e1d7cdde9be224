"""Learnable temperature, item bias, sparse table gradients and several positives per row, every backend,
against naive float64 formulas written here from SPEC §2 (the SPEC §8 oracle rule)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close_to_oracle

from fastrecloss import functional as F

BACKENDS = ("reference", "torch", "triton")
R, N, I, D = 7, 5, 13, 8  # noqa: E741 — I is the catalogue size, as in the docs


def naive_contrastive(s_pos: torch.Tensor, s_neg: torch.Tensor, eps: float, lam: float, mu: float,
                      counted: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over counted rows of −log Σ_p e^{s_p} + λ(log(ε Σ_p e^{s_p} + Σ_j e^{s_j}) − μ log n); −inf = absent."""
    lse_p = torch.logsumexp(s_pos, dim=1)
    n = torch.isfinite(s_neg).sum(1)
    terms = [torch.logsumexp(s_neg, dim=1)] + ([lse_p + math.log(eps)] if eps > 0 else [])
    denom = torch.logsumexp(torch.stack(terms, 1), dim=1)
    rows = torch.where(n > 0, -lse_p + lam * (denom - mu * torch.log(n.clamp_min(1).double())), 0.0)
    counted = torch.ones_like(rows, dtype=torch.bool) if counted is None else counted
    return (rows * counted).sum() / counted.sum()


def make(gen: torch.Generator) -> dict[str, torch.Tensor]:
    g = dict(generator=gen, dtype=torch.float64)
    return {"query": torch.randn(R, D, **g), "pos": torch.randn(R, D, **g), "pool": torch.randn(N, D, **g),
            "table": torch.randn(I, D, **g), "neg_idx": torch.randint(0, I, (R, N), generator=gen),
            "pos_idx": torch.randint(0, I, (R,), generator=gen), "bias": torch.randn(I, **g) * 0.5,
            "pool_bias": torch.randn(N, **g) * 0.5, "pos_bias": torch.randn(R, **g) * 0.5,
            "log_q": torch.randn(I, **g) * 0.3, "tau": torch.tensor(0.7, dtype=torch.float64)}


def check(fn, inputs: dict[str, torch.Tensor], diff: tuple[str, ...], backend: str, oracle_fn) -> None:
    """fn(x, backend) on fp32 inputs vs oracle_fn(x) in fp32 (the rounding allowance) and in fp64 (same values)."""
    x32 = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    x64 = {k: (v.double() if v.is_floating_point() else v) for k, v in x32.items()}

    def run(x, f):
        x = {k: (v.clone().requires_grad_(k in diff) if v.is_floating_point() else v) for k, v in x.items()}
        loss = f(x)
        grads = torch.autograd.grad(loss, [x[k] for k in diff])
        return [loss.detach()] + [g.to_dense() if g.is_sparse else g for g in grads]

    impl, ref, oracle = run(x32, lambda x: fn(x, backend)), run(x32, oracle_fn), run(x64, oracle_fn)
    for name, a, b, c in zip(("loss", *diff), impl, ref, oracle):
        assert_close_to_oracle(a, b, c, torch.float32, name)


def scores(q, vecs, tau, corr=None):
    """<q_r, v>/τ + corr over the last axis of vecs ([N, d] shared or [R, N, d])."""
    s = (q @ vecs.T if vecs.dim() == 2 else (q.unsqueeze(1) * vecs).sum(-1)) / tau
    return s if corr is None else s + corr


@pytest.mark.parametrize("backend", BACKENDS)
def test_learnable_temperature(backend, gen):
    x = make(gen)

    def ours(x, b):
        shared = F.infonce(x["query"], x["pos"], x["pool"], temperature=x["tau"], backend=b)
        indexed = F.mine_plus(x["query"], None, x["table"], neg_idx=x["neg_idx"], pos_idx=x["pos_idx"], lam=1.2,
                              temperature=x["tau"], backend=b)
        pointwise = F.bpr(x["query"], x["pos"], x["pool"], temperature=x["tau"], backend=b)
        return shared + indexed + pointwise

    def oracle(x):
        q, tau = x["query"], x["tau"]
        s_pos = (q * x["pos"]).sum(1, keepdim=True) / tau
        shared = naive_contrastive(s_pos, scores(q, x["pool"], tau), 1.0, 1.0, 0.0)
        s_pos_t = (q * x["table"][x["pos_idx"]]).sum(1, keepdim=True) / tau
        indexed = naive_contrastive(s_pos_t, scores(q, x["table"][x["neg_idx"]], tau), 0.0, 1.2, 1.0)
        pointwise = TF.softplus(scores(q, x["pool"], tau) - s_pos).mean()
        return shared + indexed + pointwise

    check(ours, x, ("query", "pos", "pool", "table", "tau"), backend, oracle)


def test_learnable_temperature_gradcheck_and_errors(gen):
    x = make(gen)
    q, table = x["query"][:3].clone().requires_grad_(), x["table"].clone().requires_grad_()
    bias = x["bias"].clone().requires_grad_()
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    for backend in ("reference", "torch"):
        def loss(a, t, b, tau, backend=backend):
            return F.mine_plus(a, None, t, neg_idx=x["neg_idx"][:3], pos_idx=x["pos_idx"][:3], temperature=tau,
                               neg_bias=b, backend=backend)
        assert torch.autograd.gradcheck(loss, (q, table, bias, tau))
    with pytest.raises(TypeError, match="temperature"):
        F.infonce(x["query"], x["pos"], x["pool"], temperature=torch.ones(2))
    with pytest.raises(ValueError, match="temperature"):
        F.infonce(x["query"], x["pos"], x["pool"], temperature=torch.tensor(-1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_item_bias(backend, gen):
    x = make(gen)

    def ours(x, b):
        shared = F.infonce(x["query"], x["pos"], x["pool"], neg_bias=x["pool_bias"], pos_bias=x["pos_bias"],
                           temperature=0.5, backend=b)
        indexed = F.mine(x["query"], None, x["table"], neg_idx=x["neg_idx"], pos_idx=x["pos_idx"], neg_bias=x["bias"],
                         log_q=x["log_q"], backend=b)
        catalogue = F.softmax_ce(x["query"], x["table"], x["pos_idx"], neg_bias=x["bias"], temperature=2.0, backend=b)
        in_batch = F.infonce(x["query"], x["pos"], None, in_batch=True, neg_bias=x["pos_bias"], backend=b)
        return shared + indexed + catalogue + in_batch

    def oracle(x):
        q, t, bias, lq = x["query"], x["table"], x["bias"], x["log_q"]
        s_pos = ((q * x["pos"]).sum(1) / 0.5 + x["pos_bias"]).unsqueeze(1)
        shared = naive_contrastive(s_pos, scores(q, x["pool"], 0.5, x["pool_bias"]), 1.0, 1.0, 0.0)
        s_pos_t = ((q * t[x["pos_idx"]]).sum(1) + bias[x["pos_idx"]] - lq[x["pos_idx"]]).unsqueeze(1)
        indexed = naive_contrastive(s_pos_t, scores(q, t[x["neg_idx"]], 1.0, bias[x["neg_idx"]] - lq[x["neg_idx"]]),
                                    0.0, 1.0, 1.0)
        catalogue = TF.cross_entropy(q @ t.T / 2.0 + bias, x["pos_idx"])
        s = q @ x["pos"].T + x["pos_bias"]
        in_batch = TF.cross_entropy(s, torch.arange(R))
        return shared + indexed + catalogue + in_batch

    check(ours, x, ("query", "pos", "pool", "table", "bias", "pool_bias", "pos_bias"), backend, oracle)


def test_item_bias_errors(gen):
    x = make(gen)
    with pytest.raises(ValueError, match="neg_bias"):
        F.infonce(x["query"], x["pos"], x["pool"], neg_bias=x["bias"])
    with pytest.raises(ValueError, match="pos_bias"):
        F.mine(x["query"], None, x["table"], neg_idx=x["neg_idx"], pos_idx=x["pos_idx"], pos_bias=x["pos_bias"])
    with pytest.raises(TypeError, match="neg_bias"):
        F.infonce(x["query"], x["pos"], x["pool"], neg_bias=torch.zeros(N, dtype=torch.int64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_table_gradient(backend, gen):
    x = make(gen)
    if backend != "triton":  # the indexed Triton kernel does not mask neg_idx = ignore_index yet (main, 286924a)
        x["neg_idx"][0, :2] = -100  # ignored negatives stay ignored after the remapping
    x["neg_idx"][1, 0] = 3
    x["pos_idx"][1] = 3  # an item both positive and negative

    def ours(x, b, table_grad="sparse"):
        indexed = F.infonce(x["query"], None, x["table"], neg_idx=x["neg_idx"], pos_idx=x["pos_idx"],
                            log_q=x["log_q"], neg_bias=x["bias"], table_grad=table_grad, backend=b)
        catalogue = F.softmax_ce(x["query"], x["table"], x["pos_idx"], table_grad=table_grad, backend=b)
        return indexed + catalogue

    def oracle(x):
        q, t, b, lq = x["query"], x["table"], x["bias"], x["log_q"]
        idx = x["neg_idx"].clamp_min(0)
        s_neg = (scores(q, t[idx], 1.0, b[idx] - lq[idx])).masked_fill(x["neg_idx"] < 0, -math.inf)
        p = x["pos_idx"]
        s_pos = ((q * t[p]).sum(1) + b[p] - lq[p]).unsqueeze(1)
        return naive_contrastive(s_pos, s_neg, 1.0, 1.0, 0.0) + TF.cross_entropy(q @ t.T, p)

    check(ours, x, ("query", "table", "bias"), backend, oracle)
    table = torch.randn(100, D, generator=gen).requires_grad_()  # a larger table: most rows untouched
    neg_idx, pos_idx = torch.where(x["neg_idx"] >= 0, x["neg_idx"] * 7, -100), x["pos_idx"] * 7 + 1

    def loss():
        return F.infonce(x["query"].float(), None, table, neg_idx=neg_idx, pos_idx=pos_idx, table_grad="sparse",
                         backend=backend)

    (grad,) = torch.autograd.grad(loss(), table)
    touched = torch.unique(torch.cat([neg_idx[neg_idx >= 0], pos_idx]))
    assert grad.is_sparse and grad.is_coalesced() and grad._indices()[0].tolist() == touched.tolist()
    loss().backward()  # (autograd's accumulation may drop the coalesced flag; the rows stay sorted and distinct)
    assert table.grad._indices()[0].tolist() == touched.tolist()
    before = table.detach().clone()
    torch.optim.SparseAdam([table], lr=0.1).step()
    moved = (table.detach() != before).any(1)
    assert moved.nonzero().squeeze(1).tolist() == touched.tolist()


def test_sparse_table_gradient_errors(gen):
    x = make(gen)
    with pytest.raises(ValueError, match="table_grad"):
        F.infonce(x["query"], x["pos"], x["pool"], table_grad="sparse")
    with pytest.raises(ValueError, match="table_grad"):
        F.infonce(x["query"], None, x["table"], neg_idx=x["neg_idx"], pos_idx=x["pos_idx"], table_grad="coo")


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_positives(backend, gen):
    x = make(gen)
    P = 3
    multi = torch.randint(0, I, (R, P), generator=gen)
    multi[0, 1:] = -100  # one positive
    multi[2] = -100  # no positive: the row is ignored
    multi[3, 2] = multi[3, 0]  # a repeated positive counts twice, as in the formula
    multi[4, 0] = x["neg_idx"][4, 1]  # a positive among the sampled negatives leaves them
    x["multi"] = multi
    pool_multi = torch.randint(0, N, (R, 2), generator=gen)
    x["pool_multi"] = pool_multi

    def ours(x, b):
        plus = F.infonce_plus(x["query"], None, x["table"], neg_idx=x["neg_idx"], pos_idx=x["multi"], eps=0.5,
                              lam=1.1, log_q=x["log_q"], backend=b)
        mine = F.mine(x["query"], None, x["pool"], pos_idx=x["pool_multi"], temperature=0.5, backend=b)
        catalogue = F.softmax_ce(x["query"], x["table"], x["multi"], backend=b)
        return plus + mine + catalogue

    def oracle(x):
        q, t, lq = x["query"], x["table"], x["log_q"]
        valid = x["multi"] >= 0
        safe = x["multi"].clamp_min(0)
        s_pos = ((q.unsqueeze(1) * t[safe]).sum(-1) - lq[safe]).masked_fill(~valid, -math.inf)
        hit = (x["neg_idx"].unsqueeze(-1) == torch.where(valid, x["multi"], -1).unsqueeze(1)).any(-1)
        s_neg = scores(q, t[x["neg_idx"]], 1.0, -lq[x["neg_idx"]]).masked_fill(hit, -math.inf)
        plus = naive_contrastive(s_pos, s_neg, 0.5, 1.1, 0.0, valid.any(1))
        s_pool = q @ x["pool"].T / 0.5
        sp = s_pool.gather(1, x["pool_multi"])
        s_neg_pool = s_pool.scatter(1, x["pool_multi"], -math.inf)
        mine = naive_contrastive(sp, s_neg_pool, 0.0, 1.0, 1.0)
        # RePlay's LogInCE: log Σ_{p∈P_r} e^{s_rp} − log Σ_{all items} e^{s_ri}, negated and averaged
        s_all = q @ t.T
        in_p = torch.zeros(R, I, dtype=torch.bool)
        in_p[torch.arange(R).repeat_interleave(P)[valid.reshape(-1)], x["multi"][valid]] = True
        counts = torch.zeros(R, I, dtype=torch.float64).index_put_(
            (torch.arange(R).repeat_interleave(P)[valid.reshape(-1)], x["multi"][valid]),
            torch.ones(int(valid.sum()), dtype=torch.float64), accumulate=True)
        log_in = torch.logsumexp(s_all + torch.log(counts), dim=1) - torch.logsumexp(s_all, dim=1)
        catalogue = -(log_in[valid.any(1)]).mean()
        return plus + mine + catalogue

    check(ours, x, ("query", "table", "pool"), backend, oracle)


def test_one_positive_in_a_column_is_the_single_positive_loss(gen):
    x = make(gen)
    neg_idx = torch.where(x["neg_idx"] == x["pos_idx"].unsqueeze(1), (x["neg_idx"] + 1) % I, x["neg_idx"])
    assert not (neg_idx == x["pos_idx"].unsqueeze(1)).any()
    kw = dict(neg_idx=neg_idx, log_q=x["log_q"], backend="torch")
    for fn in (F.infonce, F.dcl, F.mine):
        single = fn(x["query"], None, x["table"], pos_idx=x["pos_idx"], **kw)
        multi = fn(x["query"], None, x["table"], pos_idx=x["pos_idx"].unsqueeze(1), **kw)
        torch.testing.assert_close(multi, single, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="contrastive"):
        F.bpr(x["query"], None, x["table"], pos_idx=x["pos_idx"].unsqueeze(1), neg_idx=x["neg_idx"])


def test_several_positives_backward_is_nan_free_under_anomaly_mode() -> None:
    """A row whose positives are all padding must not send NaN into the backward: RecBole turns
    anomaly detection on globally when it is imported (recbole/model/sequential_recommender/sine.py)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, generator=gen, requires_grad=True)
    table = torch.randn(10, 8, generator=gen, requires_grad=True)
    pos_idx = torch.tensor([[1, 2], [3, -100], [-100, -100], [5, 6]])
    with torch.autograd.detect_anomaly(check_nan=True):
        loss = F.infonce(q, None, table, pos_idx=pos_idx, backend="torch")
        loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(table.grad).all()


def test_several_positives_never_build_an_r_by_n_by_p_tensor(gen: torch.Generator) -> None:
    """Excluding P positives from N sampled negatives is a per-row search, O(R·N + R·P) memory: no op
    of the forward or backward (torch backend) returns a tensor of R·N·P elements or more."""
    from torch.utils._python_dispatch import TorchDispatchMode

    rows, n, p, items, d = 8, 40, 24, 50, 4  # R·N·P = 7680 > R·N·d, R·I, R·P·d, I·d
    q = torch.randn(rows, d, generator=gen, requires_grad=True)
    table = torch.randn(items, d, generator=gen, requires_grad=True)
    neg_idx = torch.randint(0, items, (rows, n), generator=gen)
    pos_idx = torch.randint(0, items, (rows, p), generator=gen)
    pos_idx[1, 5:] = -100

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    with Largest() as seen:
        loss = F.infonce(q, None, table, neg_idx=neg_idx, pos_idx=pos_idx, backend="torch")
        loss.backward()
    assert 0 < seen.numel < rows * n * p, seen.numel
    with pytest.raises(ValueError, match=r"neg_idx must be an int tensor of shape \[R, N\] with R = 8"):
        F.infonce(q, None, table, neg_idx=neg_idx[:3], pos_idx=pos_idx, backend="torch")
