"""Loaders, id remapping, splits and the synthetic generator of fastrecloss.recsys.data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fastrecloss.recsys.data import (
    DataError,
    Interactions,
    detect_format,
    leave_one_out,
    leave_one_out_by_time,
    load_interactions,
    load_sequences,
    ratio_split,
    synthetic,
    to_sequences,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def pairs(inter: Interactions) -> Counter:
    """Multiset of (original user, original item) pairs."""
    return Counter((inter.user_ids[u], inter.item_ids[i]) for u, i in zip(inter.users.tolist(), inter.items.tolist()))


def test_sequences_remap_keeps_item_zero(tmp_path: Path) -> None:
    f = tmp_path / "seq.txt"
    f.write_text("7 0 5 3\n\n2 3 0\n9 10 5 0 3\n")
    data = load_sequences(f)
    assert data.user_ids == ["7", "2", "9"]
    assert data.num_items == 4  # 0, 3, 5, 10
    assert data.item_ids == ["<pad>", "0", "3", "5", "10"]
    assert all(1 <= i <= data.num_items for s in data.sequences for i in s)
    back = [[data.item_ids[i] for i in s] for s in data.sequences]
    assert back == [["0", "5", "3"], ["3", "0"], ["10", "5", "0", "3"]]
    assert data.num_interactions == 9


@pytest.mark.parametrize("text, line", [("1 2 3\n4\n", 2), ("1 2\n\n1 3\n", 3)])
def test_sequences_malformed_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(DataError, match=rf"bad\.txt:{line}:"):
        load_sequences(f)


def test_missing_file_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_sequences(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="no such file"):
        load_interactions(tmp_path / "nope.inter")
    assert issubclass(DataError, ValueError)


def test_leave_one_out() -> None:
    train, valid, test = leave_one_out([[1, 2, 3, 4], [5, 6, 7]])
    assert train == [[1, 2], [5]]
    assert valid.inputs == [[1, 2], [5]] and valid.targets == [3, 6]
    assert test.inputs == [[1, 2, 3], [5, 6]] and test.targets == [4, 7]
    with pytest.raises(ValueError, match="sequence 1 has 2 item"):
        leave_one_out([[1, 2, 3], [1, 2]])


def _write_all_formats(tmp_path: Path) -> dict[str, Path]:
    rows = [("u1", "i9", 5, 100), ("u2", "i0", 3, 50), ("u1", "i0", 4, 90), ("u3", "i9", 1, 10), ("u2", "i5", 4, 60)]
    inter = tmp_path / "x.inter"  # columns in a non-default order
    inter.write_text("timestamp:float\titem_id:token\tuser_id:token\trating:float\n"
                     + "".join(f"{t}\t{i}\t{u}\t{r}\n" for u, i, r, t in rows))
    udata = tmp_path / "u.data"
    udata.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    ml1m = tmp_path / "ratings.dat"
    ml1m.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    return {"inter": inter, "u.data": udata, "ratings.dat": ml1m}


def test_interaction_formats_agree_and_keep_everything(tmp_path: Path) -> None:
    files = _write_all_formats(tmp_path)
    expected = Counter({("u1", "i9"): 1, ("u2", "i0"): 1, ("u1", "i0"): 1, ("u3", "i9"): 1, ("u2", "i5"): 1})
    for fmt, path in files.items():
        assert detect_format(path) == fmt
        inter = load_interactions(path)
        assert pairs(inter) == expected, fmt
        assert (inter.num_users, inter.num_items) == (3, 3)
        assert sorted(inter.ratings.tolist()) == [1, 3, 4, 4, 5]
        kept = load_interactions(path, min_rating=4)
        assert pairs(kept) == Counter({("u1", "i9"): 1, ("u1", "i0"): 1, ("u2", "i5"): 1})
        assert (kept.num_users, kept.num_items) == (2, 3)
        assert kept.users.max() < kept.num_users and kept.items.max() < kept.num_items


def test_sequence_file_as_interactions(tmp_path: Path) -> None:
    f = tmp_path / "seq.txt"
    f.write_text("1 0 4 2\n2 4 0\n")
    assert detect_format(f) == "sequence"
    inter = load_interactions(f)
    assert pairs(inter) == Counter({("1", "0"): 1, ("1", "4"): 1, ("1", "2"): 1, ("2", "4"): 1, ("2", "0"): 1})
    seqs = to_sequences(inter)
    assert [[seqs.item_ids[i] for i in s] for s in seqs.sequences] == [["0", "4", "2"], ["4", "0"]]


@pytest.mark.parametrize("name, text, line, what", [
    ("a.inter", "user_id:token\titem_id:token\trating:float\n1\t2\t5\n1\t3\n", 3, "expected 3 tab-separated"),
    ("b.inter", "user_id:token\titem_id:token\trating:float\n1\t2\tfive\n", 2, "rating must be a number"),
    ("c.inter", "user:token\titem_id:token\n1\t2\n", 1, "user_id"),
    ("u.data", "1\t2\t3\t4\n1\t2\t3\n", 2, "4 fields"),
    ("ratings.dat", "1::2::3::4\n1::2::x::4\n", 2, "rating must be a number"),
])
def test_interactions_malformed(tmp_path: Path, name: str, text: str, line: int, what: str) -> None:
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(DataError, match=rf"{name}:{line}: .*{what}"):
        load_interactions(f)


def test_ratio_split_partitions_per_user() -> None:
    inter = synthetic(num_users=50, num_items=60, per_user=20, seed=3)
    split = ratio_split(inter, (0.8, 0.1, 0.1), seed=1)
    assert pairs(split.train) + pairs(split.valid) + pairs(split.test) == pairs(inter)
    for part, size in zip(split, (16, 2, 2)):
        assert np.bincount(part.users, minlength=50).tolist() == [size] * 50
    again = ratio_split(inter, (0.8, 0.1, 0.1), seed=1)
    assert np.array_equal(again.test.items, split.test.items)
    other = ratio_split(inter, (0.8, 0.1, 0.1), seed=2)
    assert not np.array_equal(other.test.items, split.test.items)
    with pytest.raises(ValueError, match="ratios"):
        ratio_split(inter, (0.8, 0.3, 0.1))


def test_leave_one_out_by_time() -> None:
    users = np.array([0, 0, 0, 0, 1, 1, 2])
    items = np.array([0, 1, 2, 3, 1, 2, 0])
    stamps = np.array([4.0, 1.0, 3.0, 2.0, 1.0, 2.0, 5.0])
    inter = Interactions(users, items, np.ones(7), stamps, 3, 4, ["a", "b", "c"], ["w", "x", "y", "z"])
    split = leave_one_out_by_time(inter)
    assert split.test.items.tolist() == [0] and split.valid.items.tolist() == [2]
    assert sorted(split.train.items.tolist()) == [0, 1, 1, 2, 3]  # users 1, 2 too short: all train


def test_synthetic_is_seeded_and_distinct_per_user() -> None:
    a, b, c = synthetic(seed=0), synthetic(seed=0), synthetic(seed=1)
    assert np.array_equal(a.items, b.items) and not np.array_equal(a.items, c.items)
    assert len(a) == a.num_users * 30
    for u in range(a.num_users):
        assert len(set(a.items[a.users == u].tolist())) == 30
    with pytest.raises(ValueError, match="per_user"):
        synthetic(num_items=5, per_user=10)


needs_data = pytest.mark.skipif(not SHARED.exists(), reason=f"real data not found at {SHARED.resolve()}")


@pytest.mark.data
@needs_data
@pytest.mark.parametrize("name, users, items, total", [
    ("Office_Products.txt", 4905, 2420, 53258),
    ("Tools_and_Home_Improvement.txt", 16638, 10217, 134476),
])
def test_shared_sequences_keep_id_zero(name: str, users: int, items: int, total: int) -> None:
    path = SHARED / "amazon" / name
    data = load_sequences(path)
    assert (data.num_users, data.num_items, data.num_interactions) == (users, items, total)
    assert data.item_ids[1] == "0"  # original id 0 became 1, not padding
    raw = [line.split()[1:] for line in path.read_text().splitlines() if line.strip()]
    assert [[data.item_ids[i] for i in s] for s in data.sequences] == raw


@pytest.mark.data
@needs_data
def test_shared_movielens() -> None:
    inter = load_interactions(SHARED / "ml-100k" / "ml-100k.inter")
    assert (len(inter), inter.num_users, inter.num_items) == (100_000, 943, 1682)
    implicit = load_interactions(SHARED / "ml-100k" / "ml-100k.inter", min_rating=4)
    assert len(implicit) == int((inter.ratings >= 4).sum())
    split = ratio_split(implicit, seed=0)
    assert len(split.train) + len(split.valid) + len(split.test) == len(implicit)
