"""SASRec (Kang & McAuley, 2018), the ContrastVAE paper's main baseline, on the shared encoder code.

Item + position embeddings → causal transformer → the hidden state at each position scored
against the tied item table; trained with the same next-item losses as ContrastVAE
(:func:`~fastrecloss.recsys.models.contrastvae.next_item_loss`: BCE with one sampled negative per
position, or the full-catalogue ``softmax_ce``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .contrastvae import (
    EncoderConfig,
    SequenceEmbedding,
    TransformerStack,
    attention_mask,
    init_weights,
    next_item_loss,
)


class SASRec(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = SequenceEmbedding(cfg)
        self.encoder = TransformerStack(cfg)
        init_weights(self, cfg.init_range)

    @property
    def table(self) -> Tensor:
        return self.embed.item.weight

    def forward(self, items: Tensor, valid: Tensor) -> Tensor:
        """Hidden states [B, L, d] of left-padded ``items`` [B, L] with real positions ``valid``."""
        return self.encoder(self.embed(items), attention_mask(valid))

    def loss_terms(self, hidden: Tensor, targets: Tensor, negatives: Tensor | None, valid: Tensor, *,
                   recon: str = "bce", recon_scale: float | Tensor = 1.0,
                   backend: str = "auto") -> dict[str, Tensor]:
        d = hidden.shape[-1]
        rec = next_item_loss(hidden.reshape(-1, d), self.table, targets.reshape(-1),
                             negatives.reshape(-1) if negatives is not None else None,
                             valid.reshape(-1).to(hidden.dtype), recon=recon, num_items=self.cfg.num_items,
                             backend=backend) * recon_scale
        return {"recon": rec, "loss": rec}

    @torch.no_grad()
    def user_vectors(self, items: Tensor, valid: Tensor) -> Tensor:
        """The hidden state at the last position [B, d] (call in eval mode)."""
        return self.encoder(self.embed(items), attention_mask(valid), last_only=True)[:, -1]

    def scores(self, user_vectors: Tensor) -> Tensor:
        """Scores over items 1..num_items, [B, num_items] (column c = item c + 1)."""
        return user_vectors @ self.table[1:self.cfg.num_items + 1].T
