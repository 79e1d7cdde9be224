"""torch.compile(fullgraph=True) traces a model that uses a loss (SPEC §4): same loss and gradients as eager."""

from __future__ import annotations

import pytest
import torch
from helpers import model_step
from torch import Tensor, nn

from fastrecloss import functional as F


class TinyRecModel(nn.Module):
    """User and item tables scored by one fastrecloss loss (the shape of an MF training step)."""

    def __init__(self, users: int, items: int, d: int, layout: str, reduction: str) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.users = nn.Parameter(torch.randn(users, d, generator=gen) * 0.3)
        self.items = nn.Parameter(torch.randn(items, d, generator=gen) * 0.3)
        self.layout = layout
        self.reduction = reduction

    def forward(self, user: Tensor, item: Tensor, neg: Tensor, log_q: Tensor) -> Tensor:
        query = self.users[user]
        if self.layout == "shared":  # a sampled pool shared by the batch, positives gathered
            return F.infonce(query, self.items[item], self.items[neg], log_q=log_q[neg], temperature=0.5,
                             reduction=self.reduction, backend="torch")
        # indexed: positives and per-row negatives are rows of the item table, gathered by the op
        return F.bce(query, None, self.items, pos_idx=item, neg_idx=neg, log_q=log_q, temperature=0.5,
                     reduction=self.reduction, backend="torch", remove_accidental_hits=True)


# Measured here (2 CPU cores): ~17 s for the first compile, 4-10 s for each further one. The first
# two cover both layouts and both reductions in the default run; the other two are opt-in (-m slow).
CASES = [("shared", "mean"), ("indexed", "none"), ("shared", "none"), ("indexed", "mean")]


@pytest.mark.parametrize(("layout", "reduction"), [
    pytest.param(*c, marks=[] if i < 2 else [pytest.mark.slow]) for i, c in enumerate(CASES)
], ids=[f"{lay}-{red}" for lay, red in CASES])
def test_compile_fullgraph_matches_eager(layout: str, reduction: str) -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    R, N, I = 16, 6, 40  # noqa: E741 - the item count of SPEC §3
    user = torch.randint(0, 10, (R,), generator=gen)
    item = torch.randint(0, I, (R,), generator=gen)
    neg = torch.randint(0, I, (N,) if layout == "shared" else (R, N), generator=gen)
    log_q = -torch.rand(I, generator=gen) * 3
    batch = (user, item, neg, log_q)
    upstream = torch.rand(R, generator=gen) if reduction == "none" else torch.tensor(1.0)
    model = TinyRecModel(10, I, 8, layout, reduction)
    eager_loss, eager_grads = model_step(model, batch, upstream)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    for _ in range(2):  # the second call reuses the compiled graph
        loss, grads = model_step(compiled, batch, upstream)
        torch.testing.assert_close(loss, eager_loss)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e)
    torch._dynamo.reset()
