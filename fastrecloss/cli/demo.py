"""``fastrecloss demo``: every loss on every backend on synthetic data.

1. Agreement: each loss × layout on each backend against the float64 reference (loss and every
   gradient), the triton backend under the Triton interpreter when there is no GPU.
2. Cost: forward+backward time and peak extra memory of the torch backend against the eager
   reference at sizes where the difference is visible, each case in a fresh process.
3. A short MF training on the synthetic default with both backends (equal metrics, time, memory).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

LOSSES = ("infonce", "infonce_plus", "dcl", "mine", "mine_plus", "bpr", "bce", "ccl")
LAYOUTS = ("shared", "per_row", "indexed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller cost cases and no MF training (for tests)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the cost table's processes, both implementations "
                             "(default 1; 0 = torch's default, one per core)")


def _agreement_inputs(layout: str, dtype: torch.dtype, seed: int = 0) -> dict:
    from ..benchmark.harness import Case, make_inputs

    case = Case("infonce", layout, rows=48, n=40, dim=16, items=300)
    x = make_inputs(case, seed=seed)
    return {k: (v.detach().to(dtype).requires_grad_() if v.is_floating_point() else v) for k, v in x.items()}


def _loss_and_grads(name: str, layout: str, backend: str, dtype: torch.dtype) -> list[torch.Tensor]:
    from .. import functional as F

    x = _agreement_inputs(layout, dtype)
    if layout == "catalogue":
        loss = F.softmax_ce(x["query"], x["table"], x["target"], backend=backend, temperature=0.5)
    else:
        extra = {"neg_idx": x["neg_idx"]} if "neg_idx" in x else {}
        loss = getattr(F, name)(x["query"], x["pos"], x["neg"], backend=backend, temperature=0.5, **extra)
    leaves = [v for v in x.values() if v.requires_grad]
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def agreement_table(backends: list[str]) -> str:
    rows = [f"| loss | layout | {' | '.join(f'max abs diff, {b}' for b in backends)} |",
            "|---|---|" + "---|" * len(backends)]
    worst = 0.0
    cases = [(name, layout) for name in LOSSES for layout in LAYOUTS] + [("softmax_ce", "catalogue")]
    for name, layout in cases:
        oracle = _loss_and_grads(name, layout, "reference", torch.float64)
        cells = []
        for backend in backends:
            got = _loss_and_grads(name, layout, backend, torch.float32)
            diff = max(float((g.double() - o).abs().max()) for g, o in zip(got, oracle))
            worst = max(worst, diff)
            cells.append(f"{diff:.1e}")
        rows.append(f"| {name} | {layout} | {' | '.join(cells)} |")
    rows.append(f"\nworst difference from the float64 reference over loss and all gradients: {worst:.1e}")
    return "\n".join(rows)


def cost_table(quick: bool, threads: int = 1) -> str:
    """The torch backend against the eager reference, ``threads`` intra-op threads each (0: torch's
    default). One thread by default: with busy cores, OpenMP threads spin-wait at each parallel
    region, which slowed the backend's many per-chunk ops about 5x and the reference's few large ones
    about 1.2x on the indexed case (README, Performance)."""
    from ..benchmark.harness import Case, measure_isolated

    scale = 4 if quick else 2
    cases = [
        Case("softmax_ce", "catalogue", rows=4096 // scale, n=50_000 // scale),
        Case("infonce_plus", "shared", rows=4096 // scale, n=16_384 // scale),
        Case("mine_plus", "indexed", rows=4096 // scale, n=256, items=100_000 // scale),
    ]
    lines = ["| case | reference ms | torch ms | time ratio | reference MiB | torch MiB | memory ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for case in cases:
        ref, ours = (measure_isolated(case, impl, repeats=2, threads=threads or None)
                     for impl in ("reference", "torch"))
        if "error" in ref or "error" in ours:
            lines.append(f"| {case.label} | {ref.get('error', '')} | {ours.get('error', '')} | | | | |")
            continue
        lines.append(
            f"| {case.label} | {ref['time_ms']:.0f} | {ours['time_ms']:.0f} | {ours['time_ms'] / ref['time_ms']:.2f}x "
            f"| {ref['peak_extra_mib']:.0f} | {ours['peak_extra_mib']:.1f} "
            f"| {ours['peak_extra_mib'] / max(ref['peak_extra_mib'], 1e-9):.3f}x |")
    return "\n".join(lines)


def run_demo(quick: bool = False, threads: int = 1) -> int:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # triton kernels on CPU tensors, for correctness only
    from ..functional import triton_available

    start = time.perf_counter()
    backends = ["torch"] + (["triton"] if triton_available() else [])
    interp = " (Triton interpreter on CPU)" if "triton" in backends and not torch.cuda.is_available() else ""
    print(f"fastrecloss demo — torch {torch.__version__}, backends: {', '.join(backends)}{interp}\n")
    print("## 1. Agreement with the float64 reference (fp32 inputs, loss and every gradient)\n")
    print(agreement_table(backends))
    print("\n## 2. Forward+backward cost: chunked torch backend vs eager reference (fresh process per case, "
          f"intra-op threads: {threads or torch.get_num_threads()})\n")
    print(cost_table(quick, threads))
    if not quick:
        try:
            from .mf_train import demo_comparison
        except ImportError:
            demo_comparison = None
        if demo_comparison is not None:
            print("\n## 3. MF on the synthetic default: reference vs torch backend\n")
            print(demo_comparison())
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_demo(quick=args.quick, threads=args.threads)
