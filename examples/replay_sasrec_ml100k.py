"""SASRec on MovieLens-100K with RePlay's ``replay.nn`` SasRec: RePlay's losses vs fastrecloss's drop-ins.

    python examples/replay_sasrec_ml100k.py --epochs 20          # needs fastrecloss[integrations]

Reads ``../shared/data/ml-100k/ml-100k.inter`` (every rating is an interaction), sorts each user's
items by time, leave-one-out (valid = second last, test = last), trains on the rest with the
next-item target at every position (the last 50), and ranks the whole catalogue for the test
item with the user's history excluded. Variants: RePlay's ``CE`` / ``CESampled`` (256 uniform
negatives shared by the batch) and ``fastrecloss.integrations.replay``'s classes of the same
names. One torch thread, each variant in its own process; prints test metrics, seconds per epoch
and peak resident memory.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sidebyside  # noqa: E402

VARIANTS = ("replay.CE", "fastrecloss.CE", "replay.CESampled", "fastrecloss.CESampled")
L = 50


def load(path: Path) -> tuple[list[np.ndarray], int]:
    raw = np.loadtxt(path, skiprows=1, usecols=(0, 1, 3), dtype=np.int64)
    _, items = np.unique(raw[:, 1], return_inverse=True)
    order = np.lexsort((raw[:, 2], raw[:, 0]))
    users, items = raw[order, 0], items[order]
    cuts = np.flatnonzero(np.diff(users)) + 1
    return np.split(items, cuts), int(items.max()) + 1


def left_pad(seqs: list[np.ndarray], pad: int, length: int) -> torch.Tensor:
    out = np.full((len(seqs), length), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-length:]
        out[i, length - len(s):] = s
    return torch.from_numpy(out)


def run(variant: str, args: Any) -> dict[str, float]:
    from replay.data import FeatureHint, FeatureSource, FeatureType
    from replay.data.nn import TensorFeatureInfo, TensorFeatureSource, TensorSchema
    from replay.nn import loss as replay_loss
    from replay.nn.sequential import SasRec

    from fastrecloss.integrations import replay as fr_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    seqs, n_items = load(Path(args.data) / "ml-100k" / "ml-100k.inter")
    schema = TensorSchema([TensorFeatureInfo(
        "item_id", is_seq=True, feature_type=FeatureType.CATEGORICAL, embedding_dim=64, padding_value=n_items,
        cardinality=n_items, feature_hint=FeatureHint.ITEM_ID,
        feature_sources=[TensorFeatureSource(FeatureSource.INTERACTIONS, "item_id")])])
    lib, name = variant.split(".")
    module = replay_loss if lib == "replay" else fr_loss
    loss = module.CE(ignore_index=n_items) if name == "CE" else module.CESampled()
    base = SasRec.from_params(schema, embedding_dim=64, num_heads=2, num_blocks=2, max_sequence_length=L,
                              dropout=0.2)
    model = SasRec(body=base.body, loss=loss)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = left_pad([s[:-2] for s in seqs], n_items, L + 1)  # inputs = [:-1], targets = [1:]
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(train), generator=gen).split(128):
            seq, target = train[idx, :-1], train[idx, 1:]
            real = seq != n_items
            batch = {"feature_tensors": {"item_id": seq}, "padding_mask": real, "positive_labels": target[..., None],
                     "target_padding_mask": (real & (target != n_items))[..., None],
                     "negative_labels": torch.randint(0, n_items, (256,), generator=gen)}
            opt.zero_grad()
            model(**batch)["loss"].backward()
            opt.step()
    per_epoch = (time.perf_counter() - start) / args.epochs
    model.eval()
    history = left_pad([s[:-1] for s in seqs], n_items, L)
    target = torch.tensor([int(s[-1]) for s in seqs])
    ranks = []
    with torch.no_grad():
        for idx in torch.arange(len(history)).split(256):
            seq = history[idx]
            logits = model(feature_tensors={"item_id": seq}, padding_mask=seq != n_items)["logits"]
            logits = torch.cat([logits, logits.new_zeros(len(seq), 1)], 1)  # a column for the padding id
            logits = logits.scatter(1, seq, -torch.inf)[:, :n_items]  # the user's history excluded
            true = logits.gather(1, target[idx, None])
            ranks.append((logits > true).sum(1))
    rank = torch.cat(ranks).double()
    hit10 = (rank < 10).double()
    return {"test_recall@10": hit10.mean().item(), "test_ndcg@10": (hit10 / torch.log2(rank + 2)).mean().item(),
            "test_recall@20": (rank < 20).double().mean().item(), "s_per_epoch": per_epoch}


if __name__ == "__main__":
    _sidebyside.main(run, VARIANTS, _sidebyside.parse(__doc__, VARIANTS, epochs=20))
