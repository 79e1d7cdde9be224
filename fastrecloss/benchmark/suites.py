"""``fastrecloss bench``: side-by-side benchmarks of our backends and the peers (SPEC §9).

Suites (``--suite``):

* ``acceptance`` — the foundation targets: torch backend vs eager reference (and
  ``torch.nn.functional.linear_cross_entropy`` for full-catalogue CE), with pass/fail against the
  ratios of the issue.
* ``full`` — every loss family × layout, forward / backward / forward+backward, fp32 and bf16,
  beside the peers (eager reference, ``torch.compile`` of the reference, hand-written
  gather+einsum+logsumexp, ``linear_cross_entropy`` and cut-cross-entropy for full catalogue).
* ``catalogue`` — full-catalogue CE at R ≥ 4096, I ≥ 50,000: ours against every peer, with a
  verdict (faster than every peer, at most 0.10× the best peer's peak extra memory).
* ``scaling`` — sweeps over N (pool / catalogue), R, negatives per row and d, log-log plots.
* ``limits`` — the largest catalogue (full-catalogue CE, R=8192) and the most negatives per row
  (indexed, R=4096) each implementation fits within 8 GiB.
* ``readme`` — acceptance, catalogue, scaling and limits in one report: every figure of the
  README's performance section (``all`` adds ``full``).

Every measurement runs in a fresh process (peak extra memory cannot leak between cases). Results
go to ``--out``: ``results.csv``, ``report.md`` and PNG plots. On CUDA the same command times
with CUDA events and includes the triton backend; on CPU the triton backend (interpreter) is for
correctness only and is not timed.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .harness import Case, measure_isolated

GIB = 2**30


@dataclass(frozen=True)
class Target:
    case: Case
    max_time_ratio: float
    max_mem_ratio: float
    beat_peer: str | None = None


ACCEPTANCE = [
    Target(Case("softmax_ce", "catalogue", rows=8192, n=50_000), 0.40, 0.05, beat_peer="linear_cross_entropy"),
    Target(Case("infonce_plus", "shared", rows=4096, n=16_384), 0.80, 0.10),
    Target(Case("mine_plus", "indexed", rows=4096, n=256, items=100_000), 0.60, 0.10),
]


def _have_cce() -> bool:
    return importlib.util.find_spec("cut_cross_entropy") is not None


def peers(case: Case) -> list[str]:
    """The implementations a user would pick instead of ours, for this case."""
    out = ["reference", "compiled_reference"]
    if case.loss in ("infonce", "softmax_ce"):
        out.append("handwritten")
    if case.layout == "catalogue":
        out.append("linear_cross_entropy")
        if _have_cce():
            out.append("cce")
    return out


def ours(device: str) -> list[str]:
    return ["torch", "triton"] if device.startswith("cuda") else ["torch"]


def naive_bytes(case: Case) -> int:
    """Rough peak of the naive path (score matrix or gathered negatives, a few live copies)."""
    elem = 4
    if case.layout in ("per_row", "indexed"):
        return 3 * case.rows * case.n * case.dim * elem
    return 4 * case.rows * case.n * elem


def full_cases(quick: bool) -> list[tuple[Case, tuple[str, ...]]]:
    """Every loss family × layout in fp32 and bf16. Forward, backward and forward+backward are
    timed separately for fp32 InfoNCE, BPR and full-catalogue CE; the rest forward+backward."""
    s = 4 if quick else 1
    every = ("fwd", "bwd", "fwdbwd")
    cases = []
    for dtype in ("float32", "bfloat16"):
        for loss in ("infonce", "mine_plus", "bpr", "bce", "ccl"):
            modes = every if dtype == "float32" and loss in ("infonce", "bpr") else ("fwdbwd",)
            cases.append((Case(loss, "shared", rows=4096 // s, n=16_384 // s, dtype=dtype), modes))
            cases.append((Case(loss, "per_row", rows=4096 // s, n=128, dtype=dtype), modes))
            cases.append((Case(loss, "indexed", rows=4096 // s, n=256, items=100_000 // s, dtype=dtype), modes))
        modes = every if dtype == "float32" else ("fwdbwd",)
        cases.append((Case("softmax_ce", "catalogue", rows=8192 // s, n=50_000 // s, dtype=dtype), modes))
        cases.append((Case("softmax_ce", "catalogue", rows=4096 // s, n=200_000 // s, dtype=dtype), modes))
    return cases


def scaling_cases(quick: bool) -> dict[str, list[Case]]:
    ns = [1_000, 10_000, 100_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
    r = 512 if quick else 2048
    return {
        "catalogue_N": [Case("softmax_ce", "catalogue", rows=r, n=n) for n in ns],
        "shared_N": [Case("infonce", "shared", rows=r, n=n) for n in ns],
        "rows_R": [Case("infonce", "shared", rows=rr, n=16_384) for rr in (256, 1024, 4096)],
        "indexed_negatives": [Case("mine_plus", "indexed", rows=r, n=nn, items=100_000) for nn in (16, 64, 256, 1024)],
        "dim_d": [Case("infonce", "shared", rows=r, n=16_384, dim=dd) for dd in (32, 64, 128, 256)],
    }


def _run(case: Case, impl: str, mode: str, args: argparse.Namespace, budget: float = float("inf"),
         repeats: int | None = None) -> dict:
    """One isolated measurement with the command line's device, repeats (unless given) and threads."""
    if impl in ("reference", "compiled_reference", "handwritten") and naive_bytes(case) > budget:
        return {"case": case.label, "impl": impl, "mode": mode,
                "error": f"skipped: the naive path needs about {naive_bytes(case) / GIB:.1f} GiB"}
    res = measure_isolated(case, impl, mode=mode, repeats=args.repeats if repeats is None else repeats,
                           device=args.device, threads=getattr(args, "threads", None))
    res.update(loss=case.loss, layout=case.layout, rows=case.rows, n=case.n, dim=case.dim, items=case.items,
               dtype=case.dtype, mode=mode)
    status = f"{res['time_ms']:9.1f} ms {res['peak_extra_mib']:9.1f} MiB" if "error" not in res else res["error"]
    print(f"  {case.label:<58} {mode:<7} {impl:<22} {status}", flush=True)
    return res


def _ratio(a: dict, b: dict, key: str) -> float | None:
    if "error" in a or "error" in b or not b.get(key):
        return None
    return a[key] / b[key]


def run_acceptance(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    results, lines = [], []
    lines += ["| case | impl | fwd+bwd ms | peak extra MiB | time vs reference | memory vs reference | target |",
              "|---|---|---:|---:|---:|---:|---|"]
    all_ok = True
    for t in ACCEPTANCE:
        impls = ["reference", "torch"] + ([t.beat_peer] if t.beat_peer else [])
        res = {i: _run(t.case, i, "fwdbwd", args) for i in impls}
        results += res.values()
        ref = res["reference"]
        for impl, r in res.items():
            tr, mr = _ratio(r, ref, "time_ms"), _ratio(r, ref, "peak_extra_mib")
            verdict = ""
            if impl == "torch":
                ok = tr is not None and mr is not None and tr <= t.max_time_ratio and mr <= t.max_mem_ratio
                if t.beat_peer:
                    peer_t = _ratio(r, res[t.beat_peer], "time_ms")
                    ok = ok and peer_t is not None and peer_t < 1
                    verdict = f"{peer_t:.2f}x {t.beat_peer}; " if peer_t is not None else ""
                verdict += f"≤{t.max_time_ratio}x time, ≤{t.max_mem_ratio}x memory: {'PASS' if ok else 'FAIL'}"
                all_ok = all_ok and ok
            lines.append(f"| {t.case.label} | {impl} | {_fmt(r, 'time_ms')} | {_fmt(r, 'peak_extra_mib')} "
                         f"| {_fmtr(tr)} | {_fmtr(mr)} | {verdict} |")
    lines.append(f"\nAll targets met: {'yes' if all_ok else 'NO'}")
    return results, lines


def _compare(args: argparse.Namespace, cases: list[tuple[Case, tuple[str, ...]]],
             ) -> tuple[list[dict], list[str], list[bool]]:
    """Our backends beside every peer, case by case; ``verdicts``: ours faster than every peer and at
    most 0.10x the best peer's peak extra memory, per (case, mode, impl)."""
    results, verdicts = [], []
    lines = ["| case | mode | impl | ms | peak extra MiB | time vs reference | time vs best peer "
             "| memory vs best peer |", "|---|---|---|---:|---:|---:|---:|---:|"]
    budget = args.naive_budget_gib * GIB
    for case, modes in cases:
        for mode in modes:
            impls = ours(args.device) + peers(case)
            res = {i: _run(case, i, mode, args, budget) for i in impls}
            results += res.values()
            ok_peers = [res[p] for p in peers(case) if "error" not in res[p]]
            best_t = min(ok_peers, key=lambda r: r["time_ms"]) if ok_peers else None
            best_m = min(ok_peers, key=lambda r: r["peak_extra_mib"]) if ok_peers else None
            for impl in ours(args.device):
                r = res[impl]
                t_ratio = _ratio(r, best_t, "time_ms") if best_t else None
                m_ratio = _ratio(r, best_m, "peak_extra_mib") if best_m else None
                verdicts.append(t_ratio is not None and m_ratio is not None and t_ratio < 1 and m_ratio <= 0.10)
                best = f"{_fmtr(t_ratio)} ({best_t['impl']})" if best_t else "n/a"
                lines.append(
                    f"| {case.label} | {mode} | {impl} | {_fmt(r, 'time_ms')} | {_fmt(r, 'peak_extra_mib')} "
                    f"| {_fmtr(_ratio(r, res['reference'], 'time_ms'))} | {best} | {_fmtr(m_ratio)} |")
    return results, lines, verdicts


def run_full(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    results, lines, _ = _compare(args, full_cases(args.quick))
    return results, lines


def run_catalogue(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Full-catalogue CE at R >= 4096, I >= 50,000, forward+backward: ours against every peer."""
    cases = [(Case("softmax_ce", "catalogue", rows=r, n=n), ("fwdbwd",))
             for r, n in ((4096, 50_000), (8192, 50_000), (4096, 100_000))]
    results, lines, verdicts = _compare(args, cases)
    lines.append(f"\nFaster than every peer with at most 0.10x the best peer's memory in every case: "
                 f"{'yes' if all(verdicts) else 'NO'}")
    return results, lines


def run_scaling(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    results, lines = [], []
    budget = args.naive_budget_gib * GIB
    for sweep, cases in scaling_cases(args.quick).items():
        for case in cases:
            for impl in ours(args.device) + peers(case):
                results.append({**_run(case, impl, "fwdbwd", args, budget), "sweep": sweep})
    lines.append("Plots: " + ", ".join(f"`scaling_{s}.png`" for s in scaling_cases(args.quick)))
    return results, lines


LIMIT_SWEEPS = {
    "catalogue": (Case("softmax_ce", "catalogue", rows=8192, n=0), (10_000, 40_000)),
    "indexed negatives per row": (Case("mine_plus", "indexed", rows=4096, n=0, items=100_000), (64, 256)),
}


def input_bytes(case: Case) -> int:
    """Bytes of the inputs (their gradients are allocated during the call: in the peak extra)."""
    elem = 4 if case.dtype == "float32" else 2
    d = case.dim
    if case.layout == "catalogue":
        return (case.rows + case.n) * d * elem + 8 * case.rows
    if case.layout == "indexed":
        return (2 * case.rows + case.items) * d * elem + 8 * case.rows * case.n
    return (2 * case.rows + case.n * (case.rows if case.layout == "per_row" else 1)) * d * elem


def run_limits(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Largest N within ``--limit-gib`` per implementation: the peak (inputs + peak extra, which holds
    the gradients) is measured at two sizes, fitted linearly in N, solved for the limit, and then
    checked by a run at the predicted size when that run is predicted to take under ``--limit-check-s``."""
    from dataclasses import replace

    limit = args.limit_gib * GIB
    results, lines = [], ["| problem | impl | largest N within "
                          f"{args.limit_gib:g} GiB | how | measured total at that N (GiB) |", "|---|---|---:|---|---:|"]
    for name, (base, (n1, n2)) in LIMIT_SWEEPS.items():
        for impl in ours(args.device) + [p for p in peers(base) if p != "compiled_reference"]:
            pts = [_run(replace(base, n=n), impl, "fwdbwd", args, repeats=1) for n in (n1, n2)]
            results += pts
            if any("error" in p for p in pts):
                lines.append(f"| {name} | {impl} | — | {pts[0].get('error') or pts[1].get('error')} | |")
                continue
            total = [input_bytes(replace(base, n=n)) + p["peak_extra_mib"] * 2**20 for n, p in zip((n1, n2), pts)]
            slope = (total[1] - total[0]) / (n2 - n1)
            n_max = int(n2 + (limit - total[1]) / slope) if slope > 0 else 0
            t_pred = pts[1]["time_ms"] / 1e3 * n_max / n2
            how, measured = f"fit through N={n1:,}, {n2:,}", ""
            if n_max > 0 and t_pred < args.limit_check_s:
                check = _run(replace(base, n=n_max), impl, "fwdbwd", args, repeats=1)
                results.append(check)
                if "error" not in check:
                    tot = input_bytes(replace(base, n=n_max)) + check["peak_extra_mib"] * 2**20
                    measured = f"{tot / GIB:.2f}"
                    how += ", checked by a run"
            else:
                how += f", extrapolated (a check run would take ~{t_pred:.0f} s)"
            lines.append(f"| {name} (R={base.rows}, d={base.dim}) | {impl} | {n_max:,} | {how} | {measured} |")
    return results, lines


def _fmt(r: dict, key: str) -> str:
    return "—" if "error" in r else f"{r[key]:.1f}"


def _fmtr(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def plot_scaling(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = {"catalogue_N": "n", "shared_N": "n", "rows_R": "rows", "indexed_negatives": "n", "dim_d": "dim"}
    paths = []
    for sweep, key in axis.items():
        rows = [r for r in results if r.get("sweep") == sweep and "error" not in r]
        if not rows:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for impl in sorted({r["impl"] for r in rows}):
            pts = sorted((r[key], r["time_ms"], r["peak_extra_mib"]) for r in rows if r["impl"] == impl)
            xs = [p[0] for p in pts]
            ax_t.plot(xs, [p[1] for p in pts], marker="o", label=impl)
            ax_m.plot(xs, [max(p[2], 1e-2) for p in pts], marker="o", label=impl)
        for ax, ylabel in ((ax_t, "forward+backward time (ms)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{sweep} ({rows[0]['case'].split(' ')[0]}, {rows[0]['device']})")
        fig.tight_layout()
        path = out / f"scaling_{sweep}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


SUITES = {"acceptance": run_acceptance, "catalogue": run_catalogue, "full": run_full, "scaling": run_scaling,
          "limits": run_limits}
GROUPS = {"all": list(SUITES), "readme": ["acceptance", "catalogue", "scaling", "limits"]}
