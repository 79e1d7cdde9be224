"""Data for the reference models: loaders, id remapping, splits and a seeded synthetic generator.

Two shapes of data:

* :class:`SequenceData` — the S3Rec/ContrastVAE format, one user a line, ``user item item …`` in
  chronological order. Item ids are remapped to ``1..num_items`` in the order of their original
  ids (0 is reserved for padding), so files whose ids start at 0 (Amazon Tools/Office) lose
  nothing. :func:`leave_one_out` gives the ContrastVAE split.
* :class:`Interactions` — (user, item, rating, timestamp) rows from a RecBole ``.inter`` file, a
  MovieLens ``u.data`` / ``ratings.dat`` file, a sequence file, or :func:`synthetic`. Users and
  items are remapped to ``0..num_users-1`` / ``0..num_items-1`` (rows of the MF tables). Splits:
  :func:`ratio_split` (per-user random, seeded) and :func:`leave_one_out_by_time`.

Malformed input raises :class:`DataError` (a ``ValueError``) with ``file:line`` in the message.
"""

from __future__ import annotations

import math
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

FORMATS = ("auto", "sequence", "inter", "u.data", "ratings.dat")
MOVIELENS_URLS = {
    "ml-100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "ml-100k/u.data"),
    "ml-1m": ("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "ml-1m/ratings.dat"),
}


class DataError(ValueError):
    """Unreadable or malformed data (the message names the file and line)."""


# ----------------------------------------------------------------------------------------------
# Sequences (S3Rec / ContrastVAE format)


@dataclass
class SequenceData:
    """User sequences with items remapped to ``1..num_items`` (0 = padding)."""

    sequences: list[list[int]]  # one chronological list of new item ids per user
    num_items: int
    item_ids: list[str]  # original id of new item i is item_ids[i]; item_ids[0] = "<pad>"
    user_ids: list[str]  # original id of user u (line order)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)


def _sort_key(token: str) -> tuple[int, int | str]:
    """Numeric ids in numeric order, then any non-numeric ids in string order."""
    try:
        return (0, int(token))
    except ValueError:
        return (1, token)


def _open_lines(path: str | Path) -> tuple[Path, list[str]]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected a data file")
    try:
        return p, p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not a UTF-8 text file ({e.reason})") from None


def load_sequences(path: str | Path) -> SequenceData:
    """Read ``user item item …`` lines (chronological); blank lines are skipped.

    Raises :class:`DataError` for a missing file, a line with a user but no item, a repeated user
    or an empty file.
    """
    p, lines = _open_lines(path)
    users: list[str] = []
    raw: list[list[str]] = []
    seen: set[str] = set()
    for lineno, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < 2:
            raise DataError(f"{p}:{lineno}: expected 'user item [item ...]', got {line.strip()!r}")
        if tokens[0] in seen:
            raise DataError(f"{p}:{lineno}: user {tokens[0]!r} appears on more than one line")
        seen.add(tokens[0])
        users.append(tokens[0])
        raw.append(tokens[1:])
    if not raw:
        raise DataError(f"{p}: no sequences found")
    originals = sorted({t for seq in raw for t in seq}, key=_sort_key)
    new_id = {t: i + 1 for i, t in enumerate(originals)}
    sequences = [[new_id[t] for t in seq] for seq in raw]
    return SequenceData(sequences, len(originals), ["<pad>", *originals], users)


class EvalSplit(NamedTuple):
    """Inputs (the history a model sees) and one target item per user."""

    inputs: list[list[int]]
    targets: list[int]


class LeaveOneOut(NamedTuple):
    train: list[list[int]]  # seq[:-2]: the prefix a model trains on
    valid: EvalSplit  # input seq[:-2], target seq[-2]
    test: EvalSplit  # input seq[:-1], target seq[-1]


def leave_one_out(sequences: Sequence[Sequence[int]]) -> LeaveOneOut:
    """ContrastVAE/S3Rec protocol: validation target = second-to-last item, test target = last.

    Every sequence needs at least 3 items (the 5-core data sets always have them).
    """
    train, v_in, v_t, t_in, t_t = [], [], [], [], []
    for u, seq in enumerate(sequences):
        if len(seq) < 3:
            raise ValueError(f"sequence {u} has {len(seq)} item(s); leave_one_out needs at least 3 per user")
        seq = list(seq)
        train.append(seq[:-2])
        v_in.append(seq[:-2])
        v_t.append(seq[-2])
        t_in.append(seq[:-1])
        t_t.append(seq[-1])
    return LeaveOneOut(train, EvalSplit(v_in, v_t), EvalSplit(t_in, t_t))


# ----------------------------------------------------------------------------------------------
# Interactions (MF)


@dataclass
class Interactions:
    """(user, item) interaction rows with ids remapped to ``0..num_users-1`` / ``0..num_items-1``."""

    users: np.ndarray  # int64 [n]
    items: np.ndarray  # int64 [n]
    ratings: np.ndarray  # float64 [n] (1.0 when the source has none)
    timestamps: np.ndarray  # float64 [n] (line order / position when the source has none)
    num_users: int
    num_items: int
    user_ids: list[str]  # original id of each new user id
    item_ids: list[str]  # original id of each new item id

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def subset(self, mask_or_index: np.ndarray) -> Interactions:
        """The same catalogue (ids unchanged) restricted to some rows."""
        return replace(self, users=self.users[mask_or_index], items=self.items[mask_or_index],
                       ratings=self.ratings[mask_or_index], timestamps=self.timestamps[mask_or_index])

    def user_items(self) -> list[list[int]]:
        """Items of each user (list per user, in row order)."""
        out: list[list[int]] = [[] for _ in range(self.num_users)]
        for u, i in zip(self.users.tolist(), self.items.tolist()):
            out[u].append(i)
        return out

    def item_counts(self) -> np.ndarray:
        return np.bincount(self.items, minlength=self.num_items)


class Split(NamedTuple):
    train: Interactions
    valid: Interactions
    test: Interactions


def _remap(tokens: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    originals = sorted(set(tokens), key=_sort_key)
    index = {t: i for i, t in enumerate(originals)}
    return np.fromiter((index[t] for t in tokens), dtype=np.int64, count=len(tokens)), originals


def _build(p: Path, users: list[str], items: list[str], ratings: list[float], stamps: list[float]) -> Interactions:
    if not users:
        raise DataError(f"{p}: no interactions found")
    u, user_ids = _remap(users)
    i, item_ids = _remap(items)
    return Interactions(u, i, np.asarray(ratings, dtype=np.float64), np.asarray(stamps, dtype=np.float64),
                        len(user_ids), len(item_ids), user_ids, item_ids)


def _float(p: Path, lineno: int, field: str, token: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise DataError(f"{p}:{lineno}: {field} must be a number, got {token!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{p}:{lineno}: {field} must be finite, got {token!r}")
    return value


def detect_format(path: str | Path) -> str:
    """'inter', 'u.data', 'ratings.dat' or 'sequence', from the file name and its first line."""
    p, lines = _open_lines(path)
    first = next((line for line in lines if line.strip()), "")
    if p.suffix == ".inter" or ":token" in first:
        return "inter"
    if p.name.endswith("ratings.dat") or "::" in first:
        return "ratings.dat"
    if p.name.endswith("u.data") or first.count("\t") == 3:
        return "u.data"
    return "sequence"


def _parse_table(p: Path, lines: list[str], sep: str | None, fmt: str) -> Interactions:
    """u.data (tab) / ratings.dat ('::'): user item rating timestamp."""
    users, items, ratings, stamps = [], [], [], []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.strip().split(sep)
        if len(parts) != 4:
            raise DataError(f"{p}:{lineno}: {fmt} expects 4 fields 'user item rating timestamp', "
                            f"got {len(parts)}: {line.strip()!r}")
        users.append(parts[0])
        items.append(parts[1])
        ratings.append(_float(p, lineno, "rating", parts[2]))
        stamps.append(_float(p, lineno, "timestamp", parts[3]))
    return _build(p, users, items, ratings, stamps)


def _parse_inter(p: Path, lines: list[str]) -> Interactions:
    """RecBole atomic file: a tab-separated header of ``name:type`` fields, then rows."""
    header_line = next((n for n, line in enumerate(lines) if line.strip()), None)
    if header_line is None:
        raise DataError(f"{p}: empty file")
    header = [h.split(":")[0].strip() for h in lines[header_line].rstrip("\n").split("\t")]
    for need in ("user_id", "item_id"):
        if need not in header:
            raise DataError(f"{p}:{header_line + 1}: header must name a {need} field "
                            f"(e.g. 'user_id:token\\titem_id:token'), got {lines[header_line]!r}")
    col = {name: header.index(name) for name in header}
    users, items, ratings, stamps = [], [], [], []
    for lineno, line in enumerate(lines[header_line + 1:], header_line + 2):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != len(header):
            raise DataError(f"{p}:{lineno}: expected {len(header)} tab-separated fields ({', '.join(header)}), "
                            f"got {len(parts)}")
        users.append(parts[col["user_id"]].strip())
        items.append(parts[col["item_id"]].strip())
        ratings.append(_float(p, lineno, "rating", parts[col["rating"]]) if "rating" in col else 1.0)
        stamps.append(_float(p, lineno, "timestamp", parts[col["timestamp"]]) if "timestamp" in col
                      else float(len(stamps)))
    return _build(p, users, items, ratings, stamps)


def _from_sequences(data: SequenceData) -> Interactions:
    users, items, stamps = [], [], []
    for u, seq in enumerate(data.sequences):
        users.extend([u] * len(seq))
        items.extend(i - 1 for i in seq)  # drop the padding slot: columns 0..num_items-1
        stamps.extend(range(len(seq)))
    n = len(users)
    return Interactions(np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64), np.ones(n),
                        np.asarray(stamps, dtype=np.float64), data.num_users, data.num_items, list(data.user_ids),
                        data.item_ids[1:])


def load_interactions(path: str | Path, fmt: str = "auto", min_rating: float | None = None) -> Interactions:
    """Read a RecBole ``.inter``, MovieLens ``u.data``/``ratings.dat`` or sequence file.

    ``fmt`` 'auto' detects the format (:func:`detect_format`). ``min_rating`` keeps rows with
    ``rating >= min_rating`` (implicit feedback) and remaps ids over what is kept. Sequence files
    get timestamps = position in the sequence.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(map(repr, FORMATS))}, got {fmt!r}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "sequence":
        inter = _from_sequences(load_sequences(path))
    else:
        p, lines = _open_lines(path)
        if fmt == "inter":
            inter = _parse_inter(p, lines)
        else:
            inter = _parse_table(p, lines, "\t" if fmt == "u.data" else "::", fmt)
    if min_rating is not None:
        inter = filter_rating(inter, min_rating, source=str(path))
    return inter


def filter_rating(inter: Interactions, min_rating: float, source: str = "data") -> Interactions:
    """Keep rows with ``rating >= min_rating``; ids are re-compacted over what is kept."""
    keep = inter.ratings >= min_rating
    if not keep.any():
        raise DataError(f"{source}: no interaction has rating >= {min_rating}")
    u_old, u_new = np.unique(inter.users[keep], return_inverse=True)
    i_old, i_new = np.unique(inter.items[keep], return_inverse=True)
    return Interactions(u_new.astype(np.int64), i_new.astype(np.int64), inter.ratings[keep], inter.timestamps[keep],
                        len(u_old), len(i_old), [inter.user_ids[k] for k in u_old],
                        [inter.item_ids[k] for k in i_old])


def download_movielens(name: str, root: str | Path, timeout: float = 30.0) -> Path:
    """Fetch ``ml-100k`` or ``ml-1m`` from files.grouplens.org into ``root``; return the ratings file.

    Raises :class:`DataError` with a clear message when the network does not allow it.
    """
    if name not in MOVIELENS_URLS:
        raise ValueError(f"name must be one of {', '.join(map(repr, MOVIELENS_URLS))}, got {name!r}")
    url, member = MOVIELENS_URLS[name]
    root = Path(root)
    target = root / member
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"{name}.zip"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, archive.open("wb") as out:
            out.write(response.read())
    except OSError as e:
        archive.unlink(missing_ok=True)
        raise DataError(f"could not download {name} from {url} ({e}); download it by hand and pass --data "
                        f"PATH/{Path(member).name}") from None
    with zipfile.ZipFile(archive) as z:
        z.extract(member, root)
    return target


# ----------------------------------------------------------------------------------------------
# Splits


def _check_ratios(ratios: Sequence[float]) -> np.ndarray:
    r = np.asarray(ratios, dtype=np.float64)
    if r.shape != (3,) or (r < 0).any() or not math.isclose(float(r.sum()), 1.0, rel_tol=1e-9):
        raise ValueError(f"ratios must be three non-negative numbers summing to 1, got {tuple(ratios)}")
    return r


def ratio_split(inter: Interactions, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
    """Per-user random split: each user's interactions are shuffled (seeded) and cut at
    ``round(n·cumsum(ratios))``: the first part is train, then valid, then test.

    A user with few interactions may get an empty valid/test part (e.g. n = 4 → 3/1/0 at
    80/10/10). Every interaction lands in exactly one part.
    """
    cuts = np.cumsum(_check_ratios(ratios))[:2]
    rng = np.random.default_rng(seed)
    part = np.empty(len(inter), dtype=np.int8)
    order = np.argsort(inter.users, kind="stable")
    bounds = np.searchsorted(inter.users[order], np.arange(inter.num_users + 1))
    for u in range(inter.num_users):
        rows = order[bounds[u]:bounds[u + 1]]
        n = rows.shape[0]
        shuffled = rows[rng.permutation(n)]
        a, b = (int(x) for x in np.floor(n * cuts + 0.5))
        part[shuffled[:a]] = 0
        part[shuffled[a:b]] = 1
        part[shuffled[b:]] = 2
    return Split(inter.subset(part == 0), inter.subset(part == 1), inter.subset(part == 2))


def leave_one_out_by_time(inter: Interactions) -> Split:
    """Each user's latest interaction is test, the one before valid, the rest train (ties in time
    keep row order). Users with fewer than 3 interactions keep everything in train."""
    part = np.zeros(len(inter), dtype=np.int8)
    order = np.lexsort((np.arange(len(inter)), inter.timestamps, inter.users))
    bounds = np.searchsorted(inter.users[order], np.arange(inter.num_users + 1))
    for u in range(inter.num_users):
        rows = order[bounds[u]:bounds[u + 1]]
        if rows.shape[0] >= 3:
            part[rows[-1]] = 2
            part[rows[-2]] = 1
    return Split(inter.subset(part == 0), inter.subset(part == 1), inter.subset(part == 2))


def to_sequences(inter: Interactions) -> SequenceData:
    """Interactions → chronological sequences (items shifted to 1..num_items; users with none dropped)."""
    order = np.lexsort((np.arange(len(inter)), inter.timestamps, inter.users))
    seqs: list[list[int]] = [[] for _ in range(inter.num_users)]
    for r in order.tolist():
        seqs[int(inter.users[r])].append(int(inter.items[r]) + 1)
    keep = [u for u in range(inter.num_users) if seqs[u]]
    return SequenceData([seqs[u] for u in keep], inter.num_items, ["<pad>", *inter.item_ids],
                        [inter.user_ids[u] for u in keep])


# ----------------------------------------------------------------------------------------------
# Synthetic data with planted structure


def synthetic(num_users: int = 600, num_items: int = 400, dim: int = 8, per_user: int = 30, *,
              temperature: float = 0.5, popularity: float = 0.8, seed: int = 0) -> Interactions:
    """Seeded implicit-feedback data with a planted low-rank structure (the embedded default).

    Users u and items i get latent vectors ``x_u, y_i ~ N(0, I_dim/dim)`` and items a Zipf-like
    popularity bias ``b_i = -popularity·log(rank_i)``; each user draws ``per_user`` distinct items
    without replacement with probability ∝ ``exp(<x_u, y_i>/temperature + b_i)``. Timestamps are
    the draw order. A model that recovers the factors ranks held-out items far above chance.
    """
    for name, value in (("num_users", num_users), ("num_items", num_items), ("dim", dim), ("per_user", per_user)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if per_user > num_items:
        raise ValueError(f"per_user ({per_user}) must be <= num_items ({num_items})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_users, dim)) / math.sqrt(dim)
    y = rng.standard_normal((num_items, dim)) / math.sqrt(dim) * 3.0
    bias = -popularity * np.log1p(rng.permutation(num_items))
    logits = x @ y.T / temperature + bias
    # Gumbel top-k = sampling without replacement proportional to exp(logits), in draw order.
    keys = logits + rng.gumbel(size=logits.shape)
    items = np.argsort(-keys, axis=1, kind="stable")[:, :per_user]
    users = np.repeat(np.arange(num_users, dtype=np.int64), per_user)
    stamps = np.tile(np.arange(per_user, dtype=np.float64), num_users)
    n = num_users * per_user
    return Interactions(users, items.reshape(-1).astype(np.int64), np.ones(n), stamps, num_users, num_items,
                        [str(u) for u in range(num_users)], [str(i) for i in range(num_items)])
