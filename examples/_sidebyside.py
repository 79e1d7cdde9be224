"""Run each variant of an example in its own process and print one table: metrics, s/epoch, peak RSS.

Each variant runs in a fresh interpreter so that its peak resident memory (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def parse(doc: str, variants: Sequence[str], epochs: int) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA), help="folder holding ml-100k/ml-100k.inter")
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--variant", choices=variants, help=argparse.SUPPRESS)
    return ap.parse_args()


def main(run: Callable[[str, Any], dict[str, float]], variants: Sequence[str], args: argparse.Namespace) -> None:
    if args.variant:  # the child: one run, one JSON line
        out = run(args.variant, args)
        print("RESULT " + json.dumps({**out, "peak_rss_mib": peak_rss_mib()}), flush=True)
        return
    rows = []
    for variant in variants:
        cmd = [sys.executable, *sys.argv, "--variant", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"variant {variant} failed")
        rows.append({"variant": variant, **json.loads(lines[-1][len("RESULT "):])})
        print(f"done: {variant}", file=sys.stderr, flush=True)
    keys = [k for k in rows[0] if k != "variant"]
    print("| variant | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{r[k]:.4f}" if abs(r[k]) < 10 else f"{r[k]:.1f}" for k in keys)
              + " |")
