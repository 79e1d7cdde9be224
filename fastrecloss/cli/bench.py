"""``fastrecloss bench``: the command line of the benchmark suites in :mod:`fastrecloss.benchmark.suites`
and of the GPU suite (``--suite gpu``, :mod:`fastrecloss.benchmark.gpu`)."""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import torch

from ..benchmark.suites import GROUPS, SUITES, plot_scaling


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=[*SUITES, *GROUPS, "gpu"], default="acceptance")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default bench/results; docs/benchmarks/gpu for --suite gpu)")
    parser.add_argument("--dry-run", action="store_true",
                        help="gpu suite: list the cases, import everything, plan the launches; launch nothing")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="gpu suite: folder of peer wheels to install offline when missing (default wheels/)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in every measuring process, for ours and the peers alike "
                             "(default 1: on busy cores more threads spin-wait and tax the chunked backend; "
                             "0 = torch's default, one per core)")
    parser.add_argument("--quick", action="store_true", help="4x smaller sizes (full), N up to 10^5 (scaling)")
    parser.add_argument("--naive-budget-gib", type=float, default=12.0,
                        help="skip naive peers whose score/gather tensors would exceed this")
    parser.add_argument("--limit-gib", type=float, default=8.0, help="memory limit of the limits suite")
    parser.add_argument("--limit-check-s", type=float, default=120.0,
                        help="limits suite: verify the predicted size by a run when it takes less than this")


def _check(args: argparse.Namespace) -> str | None:
    """The first bad argument's one-line error, or None (a bad one used to fail every case, or with a traceback)."""
    if args.repeats < 1:
        return f"--repeats must be >= 1, got {args.repeats}"
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        return f"--device {args.device!r}: {e}"
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        return f"--device {args.device}: no such CUDA device here ({torch.cuda.device_count()} visible)"
    if device.type not in ("cpu", "cuda"):
        return f"--device must be cpu or cuda[:N], got {args.device!r}"
    return None


def run(args: argparse.Namespace) -> int:
    error = _check(args)
    if error is None and args.suite != "gpu":
        args.out = args.out or Path("bench/results")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            error = f"--out {args.out}: {e.strerror or e}"
    if error is not None:
        print(f"fastrecloss bench: error: {error}", file=sys.stderr)
        return 2
    if args.suite == "gpu":
        from ..benchmark import gpu

        return gpu.run(args)
    suites = GROUPS.get(args.suite, [args.suite])
    threads = args.threads
    args.threads = threads or None  # 0: torch's default in the measuring processes
    start = time.perf_counter()
    report = [f"# fastrecloss benchmark ({', '.join(suites)})", "",
              f"Machine: {platform.processor() or platform.machine()}, {threads or torch.get_num_threads()} "
              f"threads, torch {torch.__version__}, device {args.device}. Command: `fastrecloss bench --suite "
              f"{args.suite}{' --quick' if args.quick else ''} --repeats {args.repeats} --threads {threads}`. "
              f"Median of {args.repeats} calls after a warm-up; peak extra memory above the inputs, each case in a "
              "fresh process.", ""]
    results: list[dict] = []
    for name in suites:
        print(f"== {name}", flush=True)
        res, lines = SUITES[name](args)
        results += res
        report += [f"## {name}", "", *lines, ""]
    if any(r.get("sweep") for r in results):
        plot_scaling(results, args.out)
    keys = sorted({k for r in results for k in r})
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(results)
    report.append(f"Total benchmark time: {time.perf_counter() - start:.0f} s.")
    (args.out / "report.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    return 0
