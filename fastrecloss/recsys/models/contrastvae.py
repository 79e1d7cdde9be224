"""ContrastVAE (Wang et al., CIKM 2022) and the transformer code it shares with SASRec.

Model (SPEC §10): item + learned position embeddings → separate transformer encoders for μ and
log σ² (causal + padding mask) → a latent z per position → a transformer decoder → scores
against the tied item table. Two views of every sequence are contrasted with NT-Xent on the sum
of z over the sequence's positions:

* ``ma`` (model augmentation): both views run the encoders with independent dropout;
  z = μ + σ and z' = μ' + dropout(σ');
* ``va`` (variational augmentation): z = μ + σ and z' = μ' + α·σ'⊙ε, ε ~ N(0, I), with a
  learnable scalar α = sigmoid(a) and its prior term (``alpha_prior``);
* ``da`` (data augmentation): the second view encodes a cropped / masked / reordered sequence;
  z' = μ' + dropout(σ').

z = μ + σ (no noise) for the first view and for prediction follows the published code.

Loss = recon(view 1) + recon(view 2) + β_t·(KL_1 + KL_2) + w·NT-Xent + [α prior], with β_t =
min(cap, t / anneal_steps) at optimisation step t. Reconstruction goes through
``fastrecloss.functional.bce`` (one sampled negative per position, indexed layout) or
``softmax_ce`` (full catalogue), NT-Xent through ``fastrecloss.functional.dcl`` in the shared
layout (:func:`nt_xent`), the KL in plain torch.

Padding never reaches a real position: attention uses a boolean mask (padding keys are −inf, a
padding query sees only itself), the losses weight padding rows 0, the KL and the sums of z run
over real positions only. Positions are counted from the end (the last item is at
``max_len - 1``), as if every sequence were left-padded to ``max_len``.

``padding='published'`` reproduces the published code's treatment of the padding positions that
are in the batch: a padding query attends to every position of its row (the published additive
mask puts −10000 on all of its keys, which cancels in the softmax), and the padding positions'
KL and z enter the KL sum and the NT-Xent user vector. Real positions never see padding in
either mode, so the next-item outputs at real positions are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import functional as FL

AUGS = ("va", "ma", "da")
RECONS = ("bce", "softmax_ce")
KL_NORMS = ("maxlen", "token")
PADDINGS = ("masked", "published")
# Kingma et al. (2015), variational dropout: −KL(q(α) || log-uniform prior) ≈ const + 0.5 log α + c1 α + c2 α² + c3 α³.
_PRIOR_C = (1.161451241083230, -1.502041176441722, 0.586299206427007)


@dataclass
class EncoderConfig:
    """Transformer settings shared by ContrastVAE and SASRec (defaults: the paper's)."""

    num_items: int  # catalogue 1..num_items; the table has num_items + 1 rows (+1 with a mask token)
    hidden: int = 128
    layers: int = 1
    heads: int = 4
    hidden_dropout: float = 0.3
    attn_dropout: float = 0.3
    max_len: int = 100
    init_range: float = 0.02
    mask_token: bool = False  # an extra table row (num_items + 1) for the "mask" augmentation

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        for name in ("hidden_dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def table_rows(self) -> int:
        return self.num_items + 1 + int(self.mask_token)

    @property
    def mask_id(self) -> int | None:
        return self.num_items + 1 if self.mask_token else None


def attention_mask(valid: Tensor, padding: str = "masked") -> Tensor:
    """Boolean [B, 1, L, L] (True = may attend): causal, real keys only.

    A padding query sees only itself (``padding='masked'``) or every position of its row
    (``'published'``: the published code's −10000 on all of its keys cancels in the softmax).
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(map(repr, PADDINGS))}, got {padding!r}")
    L = valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril_()
    if padding == "published":
        return ((causal & valid[:, None, :]) | ~valid[:, :, None])[:, None]
    eye = torch.eye(L, dtype=torch.bool, device=valid.device)
    return (causal & (valid[:, None, :] | eye))[:, None]


class FastDropout(nn.Module):
    """Inverted dropout whose keep-mask comes from 16-bit random integers.

    ``F.dropout`` draws one Bernoulli per element, which on CPU costs more than the GEMMs of this
    small transformer; here one 64-bit draw gives four 16-bit lanes, compared with a threshold.
    The drop probability is ``round(p·65536)/65536`` (within 8e-6 of ``p``) and the kept values
    are scaled by the exact inverse keep probability, so E[output] = input.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 65536)  # drop when the uniform 16-bit lane is below it

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
        lanes = bits.view(torch.int16)[:n].view(x.shape)
        keep = (lanes >= self.threshold - 32768).to(x.dtype).mul_(65536 / (65536 - self.threshold))
        return x * keep


class TransformerLayer(nn.Module):
    """Post-LN block as in SASRec/S3Rec: self-attention and a GELU feed-forward (4× wide)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.heads = cfg.heads
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)
        self.norm1 = nn.LayerNorm(h, eps=1e-12)
        self.ff1 = nn.Linear(h, 4 * h)
        self.ff2 = nn.Linear(4 * h, h)
        self.norm2 = nn.LayerNorm(h, eps=1e-12)
        self.drop = FastDropout(cfg.hidden_dropout)
        self.attn_drop = FastDropout(cfg.attn_dropout)

    def forward(self, x: Tensor, mask: Tensor, last_only: bool = False) -> Tensor:
        """``x`` [B, L, h], ``mask`` [B, 1, L, L]; ``last_only`` computes the last position only."""
        B, L, h = x.shape
        H = self.heads
        w, b = self.qkv.weight, self.qkv.bias
        if last_only:
            q = F.linear(x[:, -1:], w[:h], b[:h])
            k, v = F.linear(x, w[h:], b[h:]).chunk(2, dim=-1)
            x, mask = x[:, -1:], mask[:, :, -1:]
        else:
            q, k, v = F.linear(x, w, b).chunk(3, dim=-1)
        Lq = q.shape[1]
        q = q.view(B, Lq, H, h // H).transpose(1, 2)
        k = k.view(B, L, H, h // H).transpose(1, 2)
        v = v.view(B, L, H, h // H).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(h // H))
        probs = self.attn_drop(scores.masked_fill(~mask, -math.inf).softmax(dim=-1))
        a = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, Lq, h)
        x = self.norm1(x + self.drop(self.out(a)))
        return self.norm2(x + self.drop(self.ff2(F.gelu(self.ff1(x)))))


class TransformerStack(nn.Module):
    """``layers`` blocks; ``last_only`` makes the final block compute the last position only."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: Tensor, mask: Tensor, last_only: bool = False) -> Tensor:
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only=last_only and i == n - 1)
        return x


class SequenceEmbedding(nn.Module):
    """Item + position embeddings, LayerNorm, dropout; positions counted from the sequence end."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.max_len = cfg.max_len
        self.item = nn.Embedding(cfg.table_rows, cfg.hidden, padding_idx=0)
        self.position = nn.Embedding(cfg.max_len, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.drop = FastDropout(cfg.hidden_dropout)

    def forward(self, items: Tensor) -> Tensor:
        length = items.shape[1]
        if length > self.max_len:
            raise ValueError(f"items has {length} positions, more than max_len = {self.max_len}")
        pos = self.position.weight[self.max_len - length:]
        return self.drop(self.norm(self.item(items) + pos))


def init_weights(module: nn.Module, init_range: float) -> None:
    """N(0, init_range) for linear and embedding weights, zero biases, padding row 0 zero."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, init_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()


# ----------------------------------------------------------------------------------------------
# Loss terms


def next_item_loss(hidden: Tensor, table: Tensor, targets: Tensor, negatives: Tensor | None, weight: Tensor, *,
                   recon: str = "bce", num_items: int | None = None, backend: str = "auto") -> Tensor:
    """Mean next-item loss over the rows with weight 1 (padding rows have weight 0).

    ``hidden`` [R, d], ``table`` [I, d] the tied item table, ``targets`` [R] item ids,
    ``negatives`` [R] (bce: one sampled negative per row), ``weight`` [R] float. ``softmax_ce``
    scores the whole catalogue 1..num_items (the padding row and a mask-token row are excluded).
    """
    if recon == "bce":
        if negatives is None:
            raise ValueError("recon='bce' needs negatives [R] (one sampled negative per position)")
        return FL.bce(hidden, None, table, pos_idx=targets, neg_idx=negatives[:, None], weight=weight,
                      backend=backend)
    if recon == "softmax_ce":
        n = num_items if num_items is not None else table.shape[0] - 1
        excluded = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
        excluded[1:n + 1] = False
        return FL.softmax_ce(hidden, table, targets, neg_mask=excluded, weight=weight, backend=backend)
    raise ValueError(f"recon must be one of {', '.join(map(repr, RECONS))}, got {recon!r}")


def nt_xent(a: Tensor, b: Tensor, temperature: float = 0.5, backend: str = "auto") -> Tensor:
    """NT-Xent (SimCLR) between two views [B, d] with cosine similarity / τ, through fastrecloss.

    The 2B normalised views are both the queries and the shared negatives; row r's positive is its
    partner (r ± B) given by ``pos_idx``; its own column is excluded by accidental-hit removal
    (``pos_ids = neg_ids = arange(2B)``: only column r carries row r's id). With ε = 0 (``dcl``)
    and the partner among the negatives, row r's loss is −s_r,partner + log Σ_{j≠r} e^{s_rj}: the
    cross-entropy over the other 2B − 1 views. No 2B × 2B matrix is built by the torch/triton
    backends.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"the views must both have shape [B, d], got {tuple(a.shape)} and {tuple(b.shape)}")
    B = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=1)
    ids = torch.arange(2 * B, device=z.device)
    partner = torch.cat([ids[B:], ids[:B]])
    return FL.dcl(z, None, z, pos_idx=partner, pos_ids=ids, neg_ids=ids, remove_accidental_hits=True,
                  temperature=temperature, backend=backend)


def gaussian_kl(mu: Tensor, logvar: Tensor, valid: Tensor, denom: float | Tensor) -> Tensor:
    """Σ over real positions of KL(N(μ, σ²) || N(0, I)) (summed over features), divided by ``denom``."""
    kl = 0.5 * (logvar.exp() + mu.square() - 1.0 - logvar).sum(dim=-1)
    return (kl * valid).sum() / denom


def alpha_prior(alpha: Tensor) -> Tensor:
    """The α prior term of the variational augmentation: −(0.5 log α + c1 α + c2 α² + c3 α³)."""
    c1, c2, c3 = _PRIOR_C
    return -(0.5 * torch.log(alpha) + c1 * alpha + c2 * alpha ** 2 + c3 * alpha ** 3).mean()


def recon_scale(valid: Tensor, mean_positions: float | None) -> float | Tensor:
    """Factor on a batch's mean reconstruction loss.

    ``None``: 1 (the mean over the batch's real positions, as published). A number: the batch's
    real positions / ``mean_positions`` (the epoch's mean real positions per batch), so every
    position weighs the same whatever its batch: with random batches (published) that holds in
    expectation, with length-bucketed batches the plain mean would weigh a batch of short
    sequences as much as a batch of long ones.
    """
    if mean_positions is None:
        return 1.0
    return valid.sum().to(torch.float32) / mean_positions


def kl_weight(step: int, cap: float, anneal_steps: int) -> float:
    """β_t = min(cap, t / anneal_steps): linear annealing per optimisation step."""
    return min(cap, step / anneal_steps) if anneal_steps > 0 else cap


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class VAEOutput:
    mu: Tensor  # [2B, L, d] view 1 then view 2
    logvar: Tensor  # [2B, L, d]
    z: Tensor  # [2B, L, d]
    hidden: Tensor  # [2B, L, d] decoder output
    alpha: Tensor | None  # scalar (va)


class ContrastVAE(nn.Module):
    """ContrastVAE; see the module docstring. ``aug`` ∈ {'va', 'ma', 'da'}, ``padding`` ∈ {'masked', 'published'}."""

    def __init__(self, cfg: EncoderConfig, aug: str = "va", reparam_dropout: float = 0.1,
                 alpha_init: float = 0.5, padding: str = "masked") -> None:
        super().__init__()
        if aug not in AUGS:
            raise ValueError(f"aug must be one of {', '.join(map(repr, AUGS))}, got {aug!r}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(map(repr, PADDINGS))}, got {padding!r}")
        if aug == "da" and not cfg.mask_token:
            raise ValueError("aug='da' needs EncoderConfig(mask_token=True) for the mask augmentation")
        if not 0.0 < alpha_init < 1.0:
            raise ValueError(f"alpha_init must be in (0, 1), got {alpha_init}")
        self.cfg, self.aug, self.padding = cfg, aug, padding
        self.embed = SequenceEmbedding(cfg)
        self.enc_mu = TransformerStack(cfg)
        self.enc_logvar = TransformerStack(cfg)
        self.decoder = TransformerStack(cfg)
        self.latent_drop = FastDropout(reparam_dropout)
        init_weights(self, cfg.init_range)
        # α = sigmoid(alpha_logit); the published code starts at α = 0.5.
        self.alpha_logit = nn.Parameter(torch.tensor(math.log(alpha_init / (1 - alpha_init))),
                                        requires_grad=aug == "va")

    @property
    def table(self) -> Tensor:
        return self.embed.item.weight

    @property
    def alpha(self) -> Tensor:
        return torch.sigmoid(self.alpha_logit)

    def encode(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.enc_mu(x, mask), self.enc_logvar(x, mask)

    def sample_view2(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """z' of the second view (training)."""
        std = torch.exp(0.5 * logvar)
        if self.aug == "va":
            return mu + self.alpha * std * torch.randn_like(std)
        return mu + self.latent_drop(std)

    def forward(self, items: Tensor, valid: Tensor, aug_items: Tensor | None = None,
                aug_valid: Tensor | None = None) -> VAEOutput:
        """Both views of a batch (training). ``items``/``valid`` [B, L]; ``aug_*`` for 'da'."""
        mask = attention_mask(valid, self.padding)
        emb = self.embed(items)
        if self.aug == "da":
            if aug_items is None or aug_valid is None:
                raise ValueError("aug='da' needs aug_items and aug_valid [B, L]")
            x = torch.cat([emb, self.embed(aug_items)])
            enc_mask = torch.cat([mask, attention_mask(aug_valid, self.padding)])
        else:  # the same embedding (one dropout draw) encoded twice with independent dropout
            x = torch.cat([emb, emb])
            enc_mask = torch.cat([mask, mask])
        mu, logvar = self.encode(x, enc_mask)
        B = items.shape[0]
        z1 = mu[:B] + torch.exp(0.5 * logvar[:B])
        z2 = self.sample_view2(mu[B:], logvar[B:])
        z = torch.cat([z1, z2])
        hidden = self.decoder(z, torch.cat([mask, mask]))
        return VAEOutput(mu, logvar, z, hidden, self.alpha if self.aug == "va" else None)

    def loss_terms(self, out: VAEOutput, targets: Tensor, negatives: Tensor | None, valid: Tensor, step: int, *,
                   nce_weight: float, kl_cap: float, anneal_steps: int, temperature: float = 0.5,
                   recon: str = "bce", kl_norm: str = "maxlen", recon_scale: float | Tensor = 1.0,
                   backend: str = "auto") -> dict[str, Tensor]:
        """Every term and the total (``'loss'``). ``targets``/``negatives``/``valid`` [B, L].

        ``recon_scale`` multiplies the reconstruction mean (see :func:`recon_scale`).

        ``kl_norm``: 'maxlen' divides the KL summed over real positions by B·max_len (the scale of
        the published code, which averages over max_len padded positions); 'token' by the number
        of real positions. With ``padding='published'`` the KL sum and the NT-Xent user vector (the
        sum of z) also take the batch's padding positions.
        """
        if kl_norm not in KL_NORMS:
            raise ValueError(f"kl_norm must be one of {', '.join(map(repr, KL_NORMS))}, got {kl_norm!r}")
        B, L = targets.shape
        d = out.hidden.shape[-1]
        w = valid.to(out.hidden.dtype).reshape(-1).repeat(2)
        negs = negatives.reshape(-1).repeat(2) if negatives is not None else None
        rec = next_item_loss(out.hidden.reshape(-1, d), self.table, targets.reshape(-1).repeat(2), negs, w,
                             recon=recon, num_items=self.cfg.num_items, backend=backend) * recon_scale
        valid2 = torch.cat([valid, valid])
        summed = valid2 if self.padding == "masked" else torch.ones_like(valid2)  # positions in the KL and z sums
        denom = B * self.cfg.max_len if kl_norm == "maxlen" else valid.sum().clamp_min(1)
        kl = gaussian_kl(out.mu, out.logvar, summed, denom)
        user = (out.z * summed[..., None]).sum(dim=1)
        nce = nt_xent(user[:B], user[B:], temperature, backend=backend)
        beta = kl_weight(step, kl_cap, anneal_steps)
        terms = {"recon": 2 * rec, "kl": kl, "nce": nce}
        total = 2 * rec + beta * kl + nce_weight * nce
        if out.alpha is not None:
            terms["alpha_prior"] = alpha_prior(out.alpha)
            total = total + terms["alpha_prior"]
        terms["loss"] = total
        return terms

    @torch.no_grad()
    def user_vectors(self, items: Tensor, valid: Tensor) -> Tensor:
        """The decoder output at the last position [B, d] with z = μ + σ (call in eval mode)."""
        mask = attention_mask(valid)
        mu, logvar = self.encode(self.embed(items), mask)
        z = mu + torch.exp(0.5 * logvar)
        return self.decoder(z, mask, last_only=True)[:, -1]

    def scores(self, user_vectors: Tensor) -> Tensor:
        """Scores over items 1..num_items, [B, num_items] (column c = item c + 1)."""
        return user_vectors @ self.table[1:self.cfg.num_items + 1].T
