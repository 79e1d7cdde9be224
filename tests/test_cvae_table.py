"""scripts/cvae_table.py: run folder → JSON record, tables, and the committed doc equals the script's output."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cvae_table", ROOT / "scripts" / "cvae_table.py")
cvae_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cvae_table)


def _metrics(x: float) -> dict[str, float]:
    return {"recall@20": x, "recall@40": 2 * x, "ndcg@20": x / 2, "ndcg@40": x / 1.5, "hit@20": x, "mrr@20": 0.01}


def _run(tmp_path: Path, name: str, test: float, *, status: str = "early_stopped", seed: int = 42,
         walls: tuple[float, ...] = (60.0, 30.0), **hparams) -> Path:
    out = tmp_path / name
    out.mkdir()
    history = [{"epoch": e + 1, "loss": 1.0 / (e + 1), "train_seconds": 2.0, "cpu_seconds": 1.5,
                "valid": _metrics(0.1 + e / 100)} for e in range(3)]
    hp = {"recon": "bce", "seed": seed, "hidden_dropout": 0.5, "epochs": 400, **hparams}
    (out / "results.json").write_text(json.dumps({
        "model": "sasrec", "data": "../shared/data/amazon/Office_Products.txt", "hparams": hp, "status": status,
        "epochs_run": 3, "best_epoch": 3, "valid": _metrics(0.12), "test": _metrics(test), "history": history}))
    for k, wall in enumerate(walls):
        (out / f"invocation-{k}.json").write_text(json.dumps({
            "part": k, "commit": "abc", "max_minutes": 8.0, "resume": k > 0, "flags": ["--seed", str(seed)],
            "wall_seconds": wall, "rc": 0}))
    return out


def test_collect_converts_a_run_folder(tmp_path: Path) -> None:
    rec = cvae_table.collect(_run(tmp_path, "sasrec-office-bce-s42", 0.123456789, status="budget"))
    assert rec["wall_seconds"] == 90.0 and rec["train_seconds"] == 6.0 and rec["cpu_seconds"] == 4.5
    assert rec["open"] and rec["status"] == "budget" and len(rec["invocations"]) == 2
    assert rec["test"] == {"recall@20": 0.123457, "recall@40": 0.246914, "ndcg@20": 0.0617284,
                           "ndcg@40": 0.0823045}  # 6 significant digits, hit/mrr dropped
    assert [h["valid"]["recall@20"] for h in rec["history"]] == [0.1, 0.11, 0.12]
    assert rec["data"] == "Office_Products.txt" and "--seed 42" in rec["command"]
    assert json.loads(cvae_table.dumps(rec)) == rec
    with pytest.raises(ValueError, match="does not follow"):
        cvae_table.collect(_run(tmp_path, "sasrec-office-s42", 0.1))


def test_tables_mean_std_ratios_and_variants(tmp_path: Path) -> None:
    recs = [cvae_table.collect(_run(tmp_path, f"sasrec-office-bce-s{s}", x, seed=s))
            for s, x in ((42, 0.14), (43, 0.15), (44, 0.16))]
    recs.append(cvae_table.collect(_run(tmp_path, "sasrec-office-bce-l1-s42", 0.2, seed=42, layers=1)))
    table = cvae_table.dataset_table(recs, "office")
    row = next(line for line in table.splitlines() if line.startswith("| SASRec, here | BCE"))
    sd = statistics.stdev([0.14, 0.15, 0.16])
    assert f"0.1500 ± {sd:.4f}" in row and "42, 43, 44" in row and "early-stopped" in row
    assert f"| {0.15 / 0.1478:.2f} / {0.30 / 0.2251:.2f} / {0.075 / 0.0657:.2f} / " in row
    assert row.endswith("| 1.5 | 0.1 |")  # 90 s wall and 4.5 s of training CPU per run
    assert "0.2000" not in table  # a variant with one seed is not in the main table
    assert "| ContrastVAE, here | full softmax | | not run | | | | | | | | | |" in table
    variants = cvae_table.variants_table(recs)
    assert "| sasrec-office-bce-l1-s42 | layers 1 |" in variants and "(main run)" in variants
    assert "s43" not in variants  # only the seeds that have a variant
    runs = cvae_table.runs_table(recs)
    assert "| sasrec-office-bce-s43 | early-stopped | 3 (3) | 1.5 | 2.0 | 1.5 |" in runs
    # a variant with a second seed gets its own main-table row, over its seeds, labelled by its differences
    recs.append(cvae_table.collect(_run(tmp_path, "sasrec-office-bce-l1-s43", 0.22, seed=43, layers=1)))
    table = cvae_table.dataset_table(recs, "office")
    row = next(line for line in table.splitlines() if "layers 1" in line)
    assert row.startswith("| SASRec, here | BCE, 1 negative (published); layers 1 | 42, 43 |")
    assert f"0.2100 ± {statistics.stdev([0.2, 0.22]):.4f}" in row


def test_committed_doc_tables_equal_the_script_output() -> None:
    doc = cvae_table.DOC.read_text()
    generated = cvae_table.tables(cvae_table.load())
    blocks = {m.group(2) for m in cvae_table.BLOCK.finditer(doc)}
    assert blocks == set(generated)
    assert cvae_table.render(doc, generated) == doc, "run: python scripts/cvae_table.py tables --write"
    for rec in cvae_table.load():  # every committed record is one of the runs the doc's tables read
        assert cvae_table.NAME.match(rec["name"]), rec["name"]
