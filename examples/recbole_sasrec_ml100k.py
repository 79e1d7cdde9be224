"""SASRec on MovieLens-100K through RecBole's own pipeline and Trainer: RecBole's CE loss vs fastrecloss.

    python examples/recbole_sasrec_ml100k.py --epochs 2          # needs fastrecloss[integrations]

Reads ``../shared/data/ml-100k/ml-100k.inter`` (RecBole atomic format; every rating is an
interaction), leave-one-out split, full ranking. Variants: ``recbole`` (the model's own
``calculate_loss``: logits over the whole catalogue, then ``nn.CrossEntropyLoss``),
``softmax_ce`` (the same loss by ``use_fastrecloss``, no B×I logits) and ``infonce`` (sampled
softmax over 256 popularity negatives with logQ correction). One torch thread, each variant in
its own process; prints test metrics, seconds per epoch and peak resident memory.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sidebyside  # noqa: E402

VARIANTS = ("recbole", "softmax_ce", "infonce")


def run(variant: str, args: Any) -> dict[str, float]:
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    from fastrecloss.integrations.recbole import use_fastrecloss  # before RecBole's Config (compat aliases)

    if not (Path(args.data) / "ml-100k" / "ml-100k.inter").exists():
        raise SystemExit(f"ml-100k/ml-100k.inter not found under {args.data} (pass --data)")
    torch.set_num_threads(1)
    data, work = str(Path(args.data).resolve()), tempfile.mkdtemp()
    os.chdir(work)  # RecBole's Trainer writes log_tensorboard/ into the working directory
    cfg: dict[str, Any] = dict(
        data_path=data, checkpoint_dir=work, epochs=args.epochs, eval_step=args.epochs,
        train_batch_size=512, eval_batch_size=1024, learning_rate=1e-3, hidden_size=64, inner_size=128, n_layers=1,
        n_heads=2, hidden_dropout_prob=0.2, attn_dropout_prob=0.2, MAX_ITEM_LIST_LENGTH=20, loss_type="CE",
        train_neg_sample_args=None, load_col={"inter": ["user_id", "item_id", "timestamp"]},
        eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
        metrics=["Recall", "NDCG"], topk=[10, 20], valid_metric="NDCG@10", show_progress=False, state="ERROR",
        use_gpu=False, seed=2020, reproducibility=True, worker=0)
    config = Config(model="SASRec", dataset="ml-100k", config_dict=cfg)
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    model = SASRec(config, train.dataset)
    if variant == "softmax_ce":
        use_fastrecloss(model, loss="softmax_ce")
    elif variant == "infonce":
        use_fastrecloss(model, loss="infonce", negatives="popularity", num_negatives=256, item_counts=train.dataset,
                        generator=torch.Generator().manual_seed(0))
    trainer = Trainer(config, model)
    start = time.perf_counter()
    trainer.fit(train, valid_data=None, saved=False)
    per_epoch = (time.perf_counter() - start) / args.epochs
    result = trainer.evaluate(test, load_best_model=False)
    return {"test_recall@10": float(result["recall@10"]), "test_ndcg@10": float(result["ndcg@10"]),
            "test_recall@20": float(result["recall@20"]), "s_per_epoch": per_epoch}


if __name__ == "__main__":
    _sidebyside.main(run, VARIANTS, _sidebyside.parse(__doc__, VARIANTS, epochs=2))
