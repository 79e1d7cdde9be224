"""The shared correctness harness: input builders, a backend-agnostic runner and the SPEC §8 check.

Every builder returns the inputs in float64 (``make_inputs``); ``run_case`` casts the floating
tensors to the dtype under test, calls the public functional API with ``backend=`` and returns the
loss and the gradients. ``check_case`` runs the same inputs three times (the backend in dtype D,
the reference in D, and the oracle: the reference in float64 on the inputs rounded to D) and
applies :func:`assert_close_to_oracle`. Another backend is tested by adding it to
``BACKENDS_UNDER_TEST`` (or by calling these helpers with ``backend=...``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fastrecloss import functional as F

BACKENDS_UNDER_TEST: list[str] = ["torch"]
LAYOUTS = ("shared", "per_row", "indexed")
DIFF_KEYS = ("query", "pos", "neg")  # the differentiable inputs (``neg`` is the table when indexed)
FLOAT_KEYS = (*DIFF_KEYS, "log_q", "pos_log_q", "weight")  # cast to the dtype under test
# SPEC §8 tolerances, relative (see assert_close_to_oracle for the exact form).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}

FLOOR = 0.1  # smallest magnitude the relative tolerance is taken of (see assert_close_to_oracle)

Inputs = dict[str, Any]


@dataclass(frozen=True)
class LossCase:
    """A public loss function with fixed hyper-parameters; ``id`` names it in test ids."""

    id: str
    fn: str
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def pointwise(self) -> bool:
        return self.fn in ("bpr", "bce", "ccl")

    @property
    def has_pos(self) -> bool:
        return self.fn != "sampled_logsumexp"

    def __repr__(self) -> str:
        return self.id


LOSS_CASES = [
    LossCase("infonce", "infonce"),
    LossCase("infonce_plus", "infonce_plus", {"eps": 0.4, "lam": 1.1}),
    LossCase("infonce_plus_eps0", "infonce_plus", {"eps": 0.0, "lam": 1.3}),
    LossCase("dcl", "dcl"),
    LossCase("mine", "mine"),
    LossCase("mine_plus", "mine_plus", {"lam": 1.2}),
    LossCase("softmax_ce", "softmax_ce"),
    LossCase("bpr", "bpr"),
    LossCase("bce", "bce"),
    LossCase("gbce", "bce", {"beta": 0.35}),
    LossCase("ccl", "ccl", {"margin": 0.2, "neg_weight": 1.5}),
    LossCase("sampled_logsumexp", "sampled_logsumexp"),
]
CASES = {c.id: c for c in LOSS_CASES}
# One loss per family / code path: ε > 0, ε = 0, μ = 1, and each pointwise kind.
FAMILY_CASES = [CASES[k] for k in ("infonce", "infonce_plus_eps0", "mine_plus", "bpr", "gbce", "ccl")]

# Options a layout supports (``make_inputs`` keywords); "all" combines the independent ones.
OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "shared": {
        "plain": {}, "log_q": {"log_q": True}, "pos_log_q": {"pos_log_q": True}, "hits": {"hits": True},
        "mask_col": {"mask": "col"}, "mask_row": {"mask": "row"}, "weight": {"weight": True},
        "pos_idx": {"pos_idx": True}, "pos_idx_hits": {"pos_idx": True, "hits": True}, "dup": {"dup": True},
        "in_batch": {"in_batch": True},
        "in_batch_all": {"in_batch": True, "hits": True, "log_q": True, "mask": "row", "weight": True},
        "all": {"log_q": True, "pos_log_q": True, "hits": True, "mask": "row", "weight": True, "dup": True},
    },
    "per_row": {
        "plain": {}, "log_q": {"log_q": True}, "pos_log_q": {"pos_log_q": True}, "hits": {"hits": True},
        "mask_row": {"mask": "row"}, "weight": {"weight": True}, "dup": {"dup": True},
        "all": {"log_q": True, "pos_log_q": True, "hits": True, "mask": "row", "weight": True, "dup": True},
    },
    "indexed": {
        "plain": {}, "log_q": {"log_q": True}, "pos_log_q": {"pos_log_q": True}, "hits": {"hits": True},
        "mask_row": {"mask": "row"}, "weight": {"weight": True}, "pos_idx": {"pos_idx": True},
        "pos_idx_hits": {"pos_idx": True, "hits": True}, "dup": {"dup": True},
        "all": {"log_q": True, "pos_log_q": True, "hits": True, "mask": "row", "weight": True, "dup": True,
                "pos_idx": True},
    },
}


def supports(case: LossCase, layout: str, opts: dict[str, Any]) -> bool:
    """Whether the loss accepts this layout/option combination (softmax_ce: a table and a target)."""
    if case.fn == "softmax_ce":
        return layout == "shared" and not opts.get("in_batch")
    if not case.has_pos:
        return not (opts.get("in_batch") or opts.get("pos_idx") or opts.get("pos_log_q"))
    return True


def case_options(case: LossCase, layout: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The options as ``make_inputs`` needs them for this loss (softmax_ce's target is a ``pos_idx``)."""
    opts = dict(opts)
    if case.fn == "softmax_ce":
        opts["pos_idx"] = True
    opts["with_pos"] = case.has_pos
    return opts


def _embed(gen: torch.Generator, *shape: int) -> Tensor:
    # Entries of variance 1/sqrt(d): <q, v> has unit variance whatever d is.
    d = shape[-1]
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * d ** -0.25


def _randint(gen: torch.Generator, high: int, *shape: int) -> Tensor:
    return torch.randint(0, max(high, 1), shape, generator=gen)


def make_inputs(
    layout: str,
    R: int,
    N: int,
    d: int,
    *,
    gen: torch.Generator,
    with_pos: bool = True,
    pos_idx: bool = False,
    in_batch: bool = False,
    log_q: bool = False,
    pos_log_q: bool = False,
    hits: bool = False,
    mask: str | None = None,
    weight: bool = False,
    dup: bool = False,
    I: int | None = None,  # noqa: E741 - the item-table size of SPEC §3
    temperature: float = 0.5,
    scale: float = 1.0,
) -> Inputs:
    """Inputs (float64) for one layout and any option of SPEC §3/§4.

    ``pos_idx``: positives as rows of the table (shared / indexed); ``in_batch``: the positives are
    the shared negatives (``N`` is ignored, N = R); ``log_q``/``pos_log_q``: sampling corrections;
    ``hits``: accidental hits via ``pos_ids``/``neg_ids`` (or the indices themselves), some rows
    hit; ``mask``: 'col' ([N], shared) or 'row' ([R, N], row 0 fully masked); ``weight``: [R]
    with zeros; ``dup``: duplicate negatives; ``scale`` multiplies every embedding.
    """
    assert layout in LAYOUTS
    assert not (pos_idx and layout == "per_row"), "pos_idx needs the shared or indexed layout"
    assert not (in_batch and layout != "shared"), "in_batch is a shared layout"
    out: Inputs = {"query": _embed(gen, R, d) * scale, "temperature": temperature}
    if in_batch:
        N = R
        out["pos"] = _embed(gen, R, d) * scale
        out["in_batch"] = True
        if dup and R > 1:
            out["pos"][1] = out["pos"][0]
    else:
        if layout == "shared":
            out["neg"] = _embed(gen, N, d) * scale
            if dup and N > 1:
                out["neg"][N - 1] = out["neg"][0]
        elif layout == "per_row":
            out["neg"] = _embed(gen, R, N, d) * scale
            if dup and N > 1:
                out["neg"][:, N - 1] = out["neg"][:, 0]
        else:
            I = I or (max(N // 2, 1) if dup else N + 3)  # noqa: E741
            out["neg"] = _embed(gen, I, d) * scale
            out["neg_idx"] = _randint(gen, I, R, N)
            if dup and N > 1:
                out["neg_idx"][:, N - 1] = out["neg_idx"][:, 0]
        table_rows = out["neg"].shape[0]
        if with_pos and pos_idx:
            out["pos_idx"] = _randint(gen, table_rows, R)
            if layout == "indexed" and hits and N > 0:
                out["neg_idx"][::2, 0] = out["pos_idx"][::2]
        elif with_pos:
            out["pos"] = _embed(gen, R, d) * scale
    if log_q:
        shape = (out["neg"].shape[0],) if layout == "indexed" else (N,) if layout == "shared" else (R, N)
        out["log_q"] = torch.log(torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    if pos_log_q and with_pos:
        out["pos_log_q"] = torch.log(torch.rand(R, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    if hits:
        _add_hits(out, layout, R, N, gen)
    if mask == "col":
        out["neg_mask"] = torch.rand(N, generator=gen) < 0.3
    elif mask == "row":
        out["neg_mask"] = torch.rand(R, N, generator=gen) < 0.3
        out["neg_mask"][0] = True  # a row without any negative (n_r = 0)
    if weight:
        w = torch.rand(R, generator=gen, dtype=torch.float64) * 1.5 + 0.5
        w[1::3] = 0.0
        out["weight"] = w
    return out


def _add_hits(out: Inputs, layout: str, R: int, N: int, gen: torch.Generator) -> None:
    """Accidental hits: ids such that about half of the rows meet their own positive among the negatives."""
    out["remove_accidental_hits"] = True
    if out.get("in_batch"):
        out["pos_ids"] = _randint(gen, max(R // 2, 1), R)  # duplicate ids: other columns are hits too
        return
    if layout == "indexed":
        if "pos_idx" not in out:  # the negatives' ids are neg_idx itself
            pos_ids = _randint(gen, out["neg"].shape[0], R)
            if N > 0:
                pos_ids[::2] = out["neg_idx"][::2, 0]
            out["pos_ids"] = pos_ids
        return
    if layout == "shared":
        neg_ids = torch.arange(N) if "pos_idx" in out else _randint(gen, 2 * N, N)
        if "pos_idx" not in out:
            pos_ids = _randint(gen, 2 * N, R)
            if N > 0:
                pos_ids[::2] = neg_ids[_randint(gen, N, (R + 1) // 2)]
            out["pos_ids"] = pos_ids
    else:
        neg_ids = _randint(gen, 3 * N, R, N)
        pos_ids = _randint(gen, 3 * N, R)
        if N > 0:
            pos_ids[::2] = neg_ids[::2, 0]
        out["pos_ids"] = pos_ids
    out["neg_ids"] = neg_ids


def _noncontiguous(t: Tensor, mode: str) -> Tensor:
    """The same values, not contiguous: 'transposed' reverses the strides (inner stride ≠ 1);
    'sliced' is the leading part of a wider buffer (row stride > row length, like ``emb[:, :d]``)."""
    if mode == "transposed":
        dims = list(range(t.dim()))[::-1]
        return t.permute(*dims).contiguous().permute(*dims)
    assert mode == "sliced", mode
    wide = t.new_zeros(*t.shape[:-1], t.shape[-1] + 3)
    wide[..., : t.shape[-1]] = t
    return wide[..., : t.shape[-1]]


def cast_inputs(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """The floating tensors in ``dtype`` (indices, masks and flags unchanged)."""
    return {k: (v.to(dtype) if k in FLOAT_KEYS and isinstance(v, Tensor) else v) for k, v in inputs.items()}


def quantized(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """Float64 inputs holding exactly the values ``inputs`` take in ``dtype`` (what the oracle sees)."""
    return cast_inputs(cast_inputs(inputs, dtype), torch.float64)


def run_case(
    fn_name: str,
    backend: str,
    inputs: Inputs,
    dtype: torch.dtype,
    *,
    hparams: dict[str, Any] | None = None,
    reduction: str | None = "mean",
    grad_of: Iterable[str] = DIFF_KEYS,
    upstream: Tensor | None = None,
    noncontiguous: bool | str = False,
    **extra: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Call ``fastrecloss.functional.<fn_name>`` on ``inputs`` cast to ``dtype`` with ``backend``.

    Returns the loss (detached) and the gradients of the inputs named in ``grad_of`` (among
    query/pos/neg, those present), after ``backward`` with ``upstream`` (ones when the loss is not
    a scalar and no upstream is given). ``reduction=None`` leaves the function's default.
    ``noncontiguous`` ('transposed' (or True) or 'sliced') passes query/pos/neg/neg_idx as
    non-contiguous tensors.
    """
    args = cast_inputs(inputs, dtype)
    if noncontiguous:
        mode = "transposed" if noncontiguous is True else noncontiguous
        args = {k: (_noncontiguous(v, mode) if k in (*DIFF_KEYS, "neg_idx") and isinstance(v, Tensor) else v)
                for k, v in args.items()}
    leaves = {k: args[k].requires_grad_() for k in grad_of if args.get(k) is not None}
    kwargs = {k: v for k, v in args.items() if k not in ("query", "pos", "neg")}
    kwargs.update(hparams or {}, **extra)
    if reduction is not None:
        kwargs["reduction"] = reduction
    fn = getattr(F, fn_name)
    query, pos, neg = args["query"], args.get("pos"), args.get("neg")
    if fn_name == "softmax_ce":
        loss = fn(query, neg, kwargs.pop("pos_idx"), backend=backend, **kwargs)
    elif fn_name == "sampled_logsumexp":
        loss = fn(query, neg, backend=backend, **kwargs)
    else:
        loss = fn(query, pos, neg, backend=backend, **kwargs)
    if leaves and loss.requires_grad:
        g = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
        loss.backward(g)
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    return loss.detach(), grads


def assert_close_to_oracle(impl: Tensor, ref_in_dtype: Tensor, oracle: Tensor, dtype: torch.dtype, name: str) -> None:
    """SPEC §8: elementwise |impl − oracle| ≤ |reference_in_D − oracle| + tol(D).

    tol(D)_i = RTOL[D] · max(|oracle_i|, max_j |oracle_j|, FLOOR): relative to the element,
    floored at the largest magnitude of the same tensor (a norm-wise relative error: a gradient
    entry that cancels to ~0 is judged at its tensor's scale) and at FLOOR. ``make_inputs`` gives
    unit-variance scores, so losses and per-row gradient terms are O(1); FLOOR = 0.1 (1e-6 absolute
    in fp32, ~8 ulps of 1.0) absorbs the rounding of results that cancel exactly (softmax CE over a
    1-item catalogue, a mean of losses near 0), where the oracle is 0 but every order of
    summation leaves ~1e-8. Measured need over the fp32 shape grid: ≤ 0.011. A non-finite
    reference error counts as 0, never as a free pass.
    """
    assert impl.shape == oracle.shape, f"{name}: shape {tuple(impl.shape)} != oracle {tuple(oracle.shape)}"
    i, r, o = impl.detach().double(), ref_in_dtype.detach().double(), oracle.detach().double()
    assert torch.isfinite(i).all(), f"{name}: non-finite values {i[~torch.isfinite(i)][:5].tolist()}"
    if o.numel() == 0:
        return
    ref_err = torch.nan_to_num((r - o).abs(), nan=0.0, posinf=0.0)
    tol = RTOL[dtype] * torch.maximum(o.abs(), o.abs().max().clamp_min(FLOOR))
    excess = (i - o).abs() - (ref_err + tol)
    if (excess > 0).any():
        k = int(excess.flatten().argmax())
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(k), o.shape))
        raise AssertionError(
            f"{name} ({dtype}): {int((excess > 0).sum())}/{o.numel()} entries off; worst at {idx}: "
            f"impl {i.flatten()[k].item():.8g}, oracle {o.flatten()[k].item():.8g}, "
            f"ref_in_D {r.flatten()[k].item():.8g}, allowed {(ref_err + tol).flatten()[k].item():.3g}")


def check_case(
    case: LossCase,
    backend: str,
    inputs: Inputs,
    dtype: torch.dtype,
    *,
    reduction: str | None = "mean",
    grad_of: Iterable[str] = DIFF_KEYS,
    upstream: Tensor | None = None,
    noncontiguous: bool | str = False,
    **extra: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``backend`` in ``dtype``, the reference in ``dtype`` and the float64 oracle; assert the
    loss and every gradient satisfy SPEC §8 and come back in ``dtype``. Returns the backend's result."""
    grad_of = tuple(grad_of)
    kw = dict(hparams=case.hparams, reduction=reduction, grad_of=grad_of, **extra)
    up_q = upstream.to(dtype).double() if upstream is not None else None
    loss, grads = run_case(case.fn, backend, inputs, dtype, upstream=up_q, noncontiguous=noncontiguous, **kw)
    ref_loss, ref_grads = run_case(case.fn, "reference", inputs, dtype, upstream=up_q, **kw)
    o_loss, o_grads = run_case(case.fn, "reference", quantized(inputs, dtype), torch.float64, upstream=up_q, **kw)
    assert loss.dtype == dtype, f"{case.id}: loss dtype {loss.dtype} != {dtype}"
    assert_close_to_oracle(loss, ref_loss, o_loss, dtype, f"{case.id} loss")
    assert grads.keys() == o_grads.keys()
    for k, g in grads.items():
        assert g.dtype == dtype, f"{case.id}: grad {k} dtype {g.dtype} != {dtype}"
        assert_close_to_oracle(g, ref_grads[k], o_grads[k], dtype, f"{case.id} grad {k}")
    return loss, grads


def random_upstream(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def model_step(model: torch.nn.Module, batch: tuple[Tensor, ...], upstream: Tensor) -> tuple[Tensor, list[Tensor]]:
    """One forward + backward of ``model`` with the given upstream gradient: (loss, parameter grads)."""
    model.zero_grad()
    loss = model(*batch)
    loss.backward(upstream)
    return loss.detach(), [p.grad.clone() for p in model.parameters()]
