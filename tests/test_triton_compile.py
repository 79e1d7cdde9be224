"""torch.compile(fullgraph=True) of a model whose loss runs on backend="triton" matches eager (SPEC §4).

Runs on CPU tensors with the kernels under the Triton interpreter: the custom ops are opaque to
dynamo (traced through their fake implementations), and at run time they launch the
interpreted kernels, forward and backward, exactly as eager does.
"""

from __future__ import annotations

import pytest
import torch
from helpers import model_step
from torch import Tensor, nn

from fastrecloss import functional as F
from fastrecloss.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.interpreting(),
                                reason="the kernels run on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")


class TinyModel(nn.Module):
    def __init__(self, users: int, items: int, d: int, layout: str, reduction: str) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.users = nn.Parameter(torch.randn(users, d, generator=gen) * 0.3)
        self.items = nn.Parameter(torch.randn(items, d, generator=gen) * 0.3)
        self.proj = nn.Linear(d, d)
        self.layout = layout
        self.reduction = reduction

    def forward(self, user: Tensor, item: Tensor, neg: Tensor, log_q: Tensor) -> Tensor:
        query = self.proj(self.users[user])
        if self.layout == "shared":  # in-batch negatives, the positives shared by the batch
            return F.infonce(query, self.items[item], None, in_batch=True, log_q=log_q[item], temperature=0.5,
                             reduction=self.reduction, backend="triton")
        return F.bpr(query, None, self.items, pos_idx=item, neg_idx=neg, log_q=log_q, temperature=0.5,
                     reduction=self.reduction, backend="triton", remove_accidental_hits=True)


@pytest.mark.parametrize(("layout", "reduction", "backend"), [
    ("shared", "mean", "inductor"),
    ("indexed", "none", "aot_eager"),
    pytest.param("indexed", "none", "inductor", marks=pytest.mark.slow),
])
def test_compile_fullgraph_triton_matches_eager(layout: str, reduction: str, backend: str) -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    R, N, I = 12, 5, 30  # noqa: E741 - the item count of SPEC §3
    user = torch.randint(0, 10, (R,), generator=gen)
    item = torch.randint(0, I, (R,), generator=gen)
    neg = torch.randint(0, I, (R, N), generator=gen)
    log_q = -torch.rand(I, generator=gen) * 3
    batch = (user, item, neg, log_q)
    upstream = torch.rand(R, generator=gen) if reduction == "none" else torch.tensor(1.0)
    model = TinyModel(10, I, 8, layout, reduction)
    eager_loss, eager_grads = model_step(model, batch, upstream)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for _ in range(2):  # the second call reuses the compiled graph
        loss, grads = model_step(compiled, batch, upstream)
        torch.testing.assert_close(loss, eager_loss)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e)
    torch._dynamo.reset()
