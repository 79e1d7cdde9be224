#!/usr/bin/env python3
"""The ContrastVAE / SASRec results of docs/experiments/contrastvae.md: run folders → JSON → tables.

    python scripts/cvae_table.py collect /work/runs/NAME [...]
        converts each run folder (OUT/results.json of ``fastrecloss train``, plus the
        invocation-K.json files the run queue writes beside it) into
        docs/experiments/results/NAME.json: settings, per-epoch losses and validation metrics,
        best epoch, test metrics, wall time summed over every invocation
    python scripts/cvae_table.py tables [--write | --check]
        prints the doc's tables from docs/experiments/results/*.json; --write puts them into the
        doc between its ``<!-- table:KEY -->`` / ``<!-- /table -->`` markers, --check exits 1 when
        the doc's tables differ from the script's output

Run names: ``{cvae|sasrec}-{office|beauty|toys|tools}-{bce|sce}[-VARIANT]-s{seed}``; runs without
a variant are the main table of their data set, and so is a variant with more than one seed (its own
row); variants (a validation grid, --padding published) are listed with the settings in which they
differ from the main run of the same seed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "experiments" / "results"
DOC = ROOT / "docs" / "experiments" / "contrastvae.md"
METRICS = ("recall@20", "recall@40", "ndcg@20", "ndcg@40")
NAME = re.compile(r"^(cvae|sasrec)-(office|beauty|toys|tools)-(bce|sce)(?:-(.+))?-s(\d+)$")
DATASETS = {"office": "Office_Products", "beauty": "Beauty", "toys": "Toys_and_Games",
            "tools": "Tools_and_Home_Improvement"}
MACHINE = "shared 2-core development machine (other engineers' jobs running), torch CPU, --threads 1, nice 10"
# Test metrics of the ContrastVAE paper (Wang et al., CIKM 2022), R@20, R@40, N@20, N@40. ContrastVAE
# "MA" column and SASRec: ../shared/data/README.md; Office "VA" column: issue 16. The VA column of
# Toys and Tools is not available here, so their va-preset runs are compared with the MA column.
PAPER = {
    "office": {"contrastvae": ("VA", (0.1672, 0.2599, 0.0722, 0.0911)),
               "sasrec": ("", (0.1478, 0.2251, 0.0657, 0.0815))},
    "beauty": {"contrastvae": ("MA", (0.1095, 0.1541, 0.0496, 0.0587)),
               "sasrec": ("", (0.0952, 0.1389, 0.0420, 0.0509))},
    "toys": {"contrastvae": ("MA*", (0.1164, 0.1610, 0.0547, 0.0638)),
             "sasrec": ("", (0.1112, 0.1479, 0.0539, 0.0614))},
    "tools": {"contrastvae": ("MA*", (0.0731, 0.1049, 0.0326, 0.0381)),
              "sasrec": ("", (0.0640, 0.0879, 0.0294, 0.0345))},
}
MODELS = {"cvae": "contrastvae", "sasrec": "sasrec"}
RECON = {"bce": "BCE, 1 negative (published)", "sce": "full softmax"}
SAME_EXCEPT = {"seed", "epochs", "num_items"}  # not shown as a variant's difference
# Settings that runs from older trees do not record, with the value those trees used.
ADDED_LATER = {"pad_to_max_len": False, "padding": "masked"}


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _metrics(d: dict) -> dict[str, float]:
    return {k: _round(d[k]) for k in METRICS if k in d}


def collect(run_dir: Path) -> dict:
    """One run folder → the committed JSON record (see the module docstring)."""
    r = json.loads((run_dir / "results.json").read_text())
    invocations = [json.loads(p.read_text()) for p in sorted(run_dir.glob("invocation-*.json"),
                                                             key=lambda p: int(p.stem.split("-")[1]))]
    name = run_dir.name
    if not NAME.match(name):
        raise ValueError(f"run folder name {name!r} does not follow {NAME.pattern}")
    history = []
    for h in r["history"]:
        row = {k: _round(v) for k, v in h.items() if k not in ("valid", "epoch")}
        row = {"epoch": h["epoch"], **row}
        if "valid" in h:
            row["valid"] = _metrics(h["valid"])
        history.append(row)
    data = Path(r["data"]).name
    return {
        "name": name, "model": r["model"], "data": data, "status": r["status"], "open": r["status"] == "budget",
        "hparams": r["hparams"], "epochs_run": r["epochs_run"], "best_epoch": r["best_epoch"],
        "valid": _metrics(r["valid"]), "test": _metrics(r["test"]),
        "wall_seconds": _round(sum(i["wall_seconds"] for i in invocations)) if invocations else None,
        "train_seconds": _round(sum(h["train_seconds"] for h in r["history"])),
        "cpu_seconds": _round(sum(h.get("cpu_seconds", 0.0) for h in r["history"])),
        "invocations": [{k: i[k] for k in ("part", "commit", "max_minutes", "resume", "flags", "wall_seconds", "rc")}
                        for i in invocations],
        "machine": MACHINE,
        "command": (f"fastrecloss train {r['model']} --data ../shared/data/amazon/{data} --threads 1 --no-progress "
                    f"--out /work/runs/{name} " + " ".join(invocations[0]["flags"] if invocations else [])).strip(),
        "history": history,
    }


def dumps(rec: dict) -> str:
    """The record as JSON, one line per epoch of its history (small diffs, easy to read)."""
    head = json.dumps({k: v for k, v in rec.items() if k != "history"}, indent=1)
    rows = ",\n".join("  " + json.dumps(h) for h in rec["history"])
    return head[:-2] + ',\n "history": [\n' + rows + "\n ]\n}\n"


def load(results: Path = RESULTS) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def _parts(rec: dict) -> tuple[str, str, str, str, int]:
    m = NAME.match(rec["name"])
    assert m, rec["name"]
    model, data, recon, variant, seed = m.groups()
    return model, data, recon, variant or "", int(seed)


def _status(rec: dict) -> str:
    return {"early_stopped": "early-stopped", "finished": "epoch cap", "budget": "**open**"}[rec["status"]]


def _mean_std(xs: list[float], digits: int = 4) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def _ratios(test: list[dict], paper: tuple[float, ...]) -> str:
    return " / ".join(f"{statistics.mean(t[k] for t in test) / p:.2f}" for k, p in zip(METRICS, paper))


def _minutes(recs: list[dict]) -> str:
    walls = [r["wall_seconds"] for r in recs if r["wall_seconds"] is not None]
    return f"{statistics.mean(walls) / 60:.1f}" if walls else "?"


def _cpu_minutes(recs: list[dict]) -> str:
    return f"{statistics.mean(r['cpu_seconds'] for r in recs) / 60:.1f}"


def _group_row(label: str, loss: str, group: list[dict], paper: tuple[float, ...]) -> str:
    """One row of a main table: a setting over its seeds (mean ± std), against the paper."""
    group = sorted(group, key=lambda r: _parts(r)[4])
    seeds = ", ".join(str(_parts(r)[4]) for r in group)
    status = ", ".join(_status(r) for r in group)  # per seed, in the order of the seeds column
    epochs = ", ".join(f"{r['epochs_run']} ({r['best_epoch']})" for r in group)
    tests = [r["test"] for r in group]
    cells = [_mean_std([r["valid"]["ndcg@20"] for r in group])]
    cells += [_mean_std([t[k] for t in tests]) for k in METRICS]
    return (f"| {label} | {loss} | {seeds} | {status} | {epochs} | " + " | ".join(cells)
            + f" | {_ratios(tests, paper)} | {_minutes(group)} | {_cpu_minutes(group)} |")


def dataset_table(recs: list[dict], data: str) -> str:
    """Main table of one data set: the paper's rows, then each (model, loss) over its seeds, and each
    variant of it that ran with more than one seed (a setting the grid's validation singled out)."""
    own = [r for r in recs if _parts(r)[1] == data]
    head = ("| model | loss | seeds | status | epochs (best) | val N@20 | test R@20 | test R@40 | test N@20 "
            "| test N@40 | ratio to paper R@20 / R@40 / N@20 / N@40 | wall min / run | train CPU min / run |\n"
            "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    lines = [head]
    for model in ("cvae", "sasrec"):
        column, paper = PAPER[data][MODELS[model]]
        label = "ContrastVAE" if model == "cvae" else "SASRec"
        loss = "BCE, 1 negative" if model == "cvae" else ""
        lines.append(f"| {label}, paper{f' ({column})' if column else ''} | {loss} | | | | | "
                     + " | ".join(f"{p:.4f}" for p in paper) + " | | | |")
        for recon in ("bce", "sce"):
            runs = [r for r in own if _parts(r)[0] == model and _parts(r)[2] == recon]
            by_variant: dict[str, list[dict]] = {}
            for r in runs:
                by_variant.setdefault(_parts(r)[3], []).append(r)
            main = by_variant.pop("", [])
            if not main:
                lines.append(f"| {label}, here | {RECON[recon]} | | not run | | | | | | | | | |")
            else:
                lines.append(_group_row(f"{label}, here", RECON[recon], main, paper))
            for _, group in sorted(by_variant.items()):
                if len(group) > 1:
                    lines.append(_group_row(f"{label}, here", f"{RECON[recon]}; {_differences(group[0], recs)}",
                                            group, paper))
    return "\n".join(lines)


def _differences(rec: dict, recs: list[dict]) -> str:
    model, data, recon, _, seed = _parts(rec)
    base = next((r for r in recs if _parts(r) == (model, data, recon, "", seed)), None)
    if base is None:
        return "(no main run of this seed)"
    diff = [f"{k} {rec['hparams'][k]}" for k in rec["hparams"]
            if k not in SAME_EXCEPT and rec["hparams"][k] != base["hparams"].get(k, ADDED_LATER.get(k))]
    return ", ".join(diff) or "(none)"


def variants_table(recs: list[dict], data: str = "office") -> str:
    """The variants of one data set beside their main runs: validation first (choices are made on it)."""
    rows = [r for r in recs if _parts(r)[1] == data]
    keyed = sorted(rows, key=lambda r: (_parts(r)[0], _parts(r)[2], _parts(r)[4], _parts(r)[3]))
    variants = {(_parts(r)[0], _parts(r)[2], _parts(r)[4]) for r in rows if _parts(r)[3]}
    lines = ["| run | differs from the main run in | status | epochs (best) | val R@20 | val N@20 | test R@20 "
             "| test N@20 | wall min |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in keyed:
        model, _, recon, variant, seed = _parts(r)
        if (model, recon, seed) not in variants:
            continue
        what = _differences(r, recs) if variant else "(main run)"
        lines.append(f"| {r['name']} | {what} | {_status(r)} | {r['epochs_run']} ({r['best_epoch']}) | "
                     f"{r['valid']['recall@20']:.4f} | {r['valid']['ndcg@20']:.4f} | {r['test']['recall@20']:.4f} | "
                     f"{r['test']['ndcg@20']:.4f} | {_minutes([r])} |")
    return "\n".join(lines)


def runs_table(recs: list[dict]) -> str:
    """Every run: progress and cost per training epoch (CPU seconds are robust to the machine's load)."""
    lines = ["| run | status | epochs (best) | train CPU s / epoch | train wall s / epoch "
             "| wall min, all invocations |", "|---|---|---|---:|---:|---:|"]
    for r in sorted(recs, key=lambda r: _parts(r)[1:3] + _parts(r)[:1] + _parts(r)[3:]):
        n = max(r["epochs_run"], 1)
        lines.append(f"| {r['name']} | {_status(r)} | {r['epochs_run']} ({r['best_epoch']}) "
                     f"| {r['cpu_seconds'] / n:.1f} | {r['train_seconds'] / n:.1f} | {_minutes([r])} |")
    return "\n".join(lines)


def open_runs(recs: list[dict]) -> str:
    """The runs stopped by --max-minutes, with the command that continues each."""
    rows = [r for r in recs if r["open"]]
    if not rows:
        return "(none)"
    return "\n".join(f"    {r['command']} --max-minutes 30 --resume   # {r['epochs_run']} epochs done" for r in rows)


def tables(recs: list[dict]) -> dict[str, str]:
    out = {data: dataset_table(recs, data) for data in DATASETS}
    out["variants"] = variants_table(recs)
    out["runs"] = runs_table(recs)
    out["open"] = open_runs(recs)
    return out


BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(doc: str, generated: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        return m.group(1) + generated[m.group(2)] + "\n" + m.group(4)
    return BLOCK.sub(sub, doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("collect")
    p.add_argument("runs", nargs="+", type=Path)
    p = sub.add_parser("tables")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true")
    g.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "collect":
        RESULTS.mkdir(parents=True, exist_ok=True)
        for run in args.runs:
            rec = collect(run)
            (RESULTS / f"{rec['name']}.json").write_text(dumps(rec))
            print(f"{rec['name']}: {rec['status']}, {rec['epochs_run']} epochs (best {rec['best_epoch']})")
        return 0
    generated = tables(load())
    if args.write or args.check:
        doc = DOC.read_text()
        new = render(doc, generated)
        if args.check:
            if new != doc:
                print(f"{DOC}: the tables differ from `python scripts/cvae_table.py tables` (run it with --write)")
                return 1
            return 0
        DOC.write_text(new)
        return 0
    for key, text in generated.items():
        print(f"<!-- table:{key} -->\n{text}\n<!-- /table -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
