"""``fastrecloss bench --suite gpu``: the one command to run on a CUDA machine.

Two parts, written to ``docs/benchmarks/gpu/`` (``report.md``, ``oracle.csv``, ``timings.csv``):

1. **Compiled oracle check** — every loss × layout × option set × dtype (fp32, bf16, fp16) through
   ``backend="triton"`` on CUDA tensors (the real ``tl.dot``/MMA paths, not the interpreter),
   against the float64 reference with the SPEC §8 rule
   ``|impl − oracle| ≤ |reference_in_D − oracle| + tol(D)·(1 + |oracle|)``, for the loss and
   every gradient; plus a bit-identity check of ``deterministic=True``.
2. **Timings** — forward, backward and forward+backward (CUDA events, median) and peak extra
   memory (``torch.cuda.max_memory_allocated`` above the inputs) at the sizes of
   ``docs/roofline.md``, beside the peers: ``torch.compile`` of the reference,
   ``F.linear_cross_entropy`` (where this torch has it), cut-cross-entropy and Liger-Kernel's
   fused linear cross-entropy (full catalogue, where importable).

It uses the machine's own torch and triton (it needs nothing newer than torch 2.4's
``torch.library.custom_op``; torch 2.11 was seen on the GPU machine). A GPU machine may reach no
package registry: put the peers' wheels in ``--wheels`` (default ``wheels/`` beside the project;
``pip download --no-deps cut-cross-entropy liger-kernel -d wheels`` on a connected machine) and
the suite installs the missing ones from there with ``pip --no-index --no-deps``. Sized to finish
in under 8 minutes on one H100-class GPU (``--quick`` quarters the timing sizes).

``--dry-run`` (what the default CPU tests run): lists the oracle and timing cases, imports every
module the run needs, reports which peers are present, and plans every timing case's kernel
launches on the meta device (grids, tiles) — no kernel is launched and no GPU is needed.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .. import functional as F
from .harness import Case, implementation, make_inputs

OUT = Path("docs/benchmarks/gpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-2}
PEERS = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}
PEER_WHEELS = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}


# --- 1. compiled oracle check ------------------------------------------------------------------


@dataclass(frozen=True)
class OracleCase:
    loss: str
    layout: str  # shared | per_row | indexed | catalogue
    dtype: str
    options: str  # plain | all
    params: dict = field(default_factory=dict, hash=False)

    @property
    def label(self) -> str:
        return f"{self.loss}/{self.layout}/{self.options}/{self.dtype}"


LOSSES = {"infonce": {}, "infonce_plus": {"eps": 0.5, "lam": 1.1}, "dcl": {}, "mine": {}, "mine_plus": {"lam": 1.1},
          "bpr": {}, "bce": {"beta": 0.5}, "ccl": {"margin": 0.3, "neg_weight": 2.0}}


def oracle_cases() -> list[OracleCase]:
    out = []
    for dtype in DTYPES:
        for options in ("plain", "all"):
            out.append(OracleCase("softmax_ce", "catalogue", dtype, options))
            for loss, params in LOSSES.items():
                for layout in ("shared", "per_row", "indexed"):
                    out.append(OracleCase(loss, layout, dtype, options, params))
    return out


def _oracle_inputs(case: OracleCase, device: str, seed: int = 0) -> tuple[dict[str, Tensor], dict]:
    """fp64 leaf tensors and the keyword arguments of the call (R=67, N=45, d=40: every tile ragged)."""
    g = torch.Generator().manual_seed(seed)
    R, N, d, I = 67, 45, 40, 300  # noqa: E741
    x: dict[str, Tensor] = {"query": torch.randn(R, d, generator=g, dtype=torch.float64) / d**0.25}
    kw: dict = dict(temperature=0.3, **case.params)
    if case.layout == "catalogue":
        x["table"] = torch.randn(I, d, generator=g, dtype=torch.float64) / d**0.25
        kw["target"] = torch.randint(0, I, (R,), generator=g)
        if case.options == "all":
            kw["log_q"] = -torch.rand(I, generator=g, dtype=torch.float64) * 4
            kw["weight"] = torch.rand(R, generator=g, dtype=torch.float64)
        return x, kw
    x["pos"] = torch.randn(R, d, generator=g, dtype=torch.float64) / d**0.25
    if case.layout == "shared":
        x["neg"] = torch.randn(N, d, generator=g, dtype=torch.float64) / d**0.25
        score_shape = (R, N)
    elif case.layout == "per_row":
        x["neg"] = torch.randn(R, N, d, generator=g, dtype=torch.float64) / d**0.25
        score_shape = (R, N)
    else:
        x["neg"] = torch.randn(I, d, generator=g, dtype=torch.float64) / d**0.25
        kw["neg_idx"] = torch.randint(0, I, (R, N), generator=g)
        score_shape = (R, N)
    if case.options == "all":
        lq_shape = {"shared": (N,), "per_row": score_shape, "indexed": (I,)}[case.layout]
        kw["log_q"] = -torch.rand(*lq_shape, generator=g, dtype=torch.float64) * 4
        kw["neg_mask"] = torch.rand(*score_shape, generator=g) < 0.2
        kw["weight"] = torch.rand(R, generator=g, dtype=torch.float64)
        if case.layout == "indexed":
            kw["pos_ids"] = torch.randint(0, I, (R,), generator=g)
            kw["remove_accidental_hits"] = True
    return x, kw


def _call(case: OracleCase, x: dict[str, Tensor], kw: dict, backend: str, **extra) -> Tensor:
    fn = getattr(F, case.loss)
    if case.layout == "catalogue":
        return fn(x["query"], x["table"], kw["target"], backend=backend,
                  **{k: v for k, v in kw.items() if k != "target"}, **extra)
    return fn(x["query"], x["pos"], x["neg"], backend=backend, **kw, **extra)


def _run_oracle_case(case: OracleCase, x64: dict[str, Tensor], kw64: dict, device: str, dtype: torch.dtype,
                     backend: str, **extra) -> list[Tensor]:
    def cast(t):
        if not isinstance(t, Tensor):
            return t
        t = t.to(device)
        return t.to(dtype) if t.is_floating_point() and t.dtype == torch.float64 and t.dim() >= 2 else t

    x = {k: cast(v).detach().requires_grad_() for k, v in x64.items()}
    kw = {k: cast(v) for k, v in kw64.items()}
    if "log_q" in kw:
        kw["log_q"] = kw["log_q"].float() if dtype != torch.float64 else kw["log_q"]
    if "weight" in kw:
        kw["weight"] = kw["weight"].float() if dtype != torch.float64 else kw["weight"]
    loss = _call(case, x, kw, backend, **extra)
    grads = torch.autograd.grad(loss, list(x.values()))
    return [loss.detach().double().cpu(), *(g.double().cpu() for g in grads)]


def check_oracle(case: OracleCase, device: str) -> dict:
    """One case: max excess over the SPEC §8 allowance (≤ 0 passes) for the loss and every gradient."""
    x64, kw64 = _oracle_inputs(case, "cpu")
    oracle = _run_oracle_case(case, x64, kw64, "cpu", torch.float64, "reference")
    dtype = DTYPES[case.dtype]
    ref_d = _run_oracle_case(case, x64, kw64, device, dtype, "reference")
    got = _run_oracle_case(case, x64, kw64, device, dtype, "triton")
    excess = max(float(((g - o).abs() - (r - o).abs() - TOL[case.dtype] * (1 + o.abs())).max())
                 for g, r, o in zip(got, ref_d, oracle))
    row = {"case": case.label, "excess": excess, "ok": excess <= 0}
    if case.layout == "indexed":
        again = [_run_oracle_case(case, x64, kw64, device, dtype, "triton", deterministic=True) for _ in range(2)]
        row["deterministic_bitwise"] = all(torch.equal(a, b) for a, b in zip(*again))
        row["ok"] = row["ok"] and row["deterministic_bitwise"]
    return row


# --- 2. timings --------------------------------------------------------------------------------


def timing_cases(quick: bool) -> list[tuple[Case, tuple[str, ...]]]:
    """The roofline sizes (docs/roofline.md) and the peers timed beside ours at each."""
    k = 4 if quick else 1
    return [
        (Case("infonce", "shared", rows=16384 // k, n=16384 // k, dim=64, dtype="bfloat16"),
         ("triton", "compiled_reference")),
        (Case("infonce", "indexed", rows=4096 // k, n=512, dim=128, items=10_000_000 // k, dtype="bfloat16"),
         ("triton", "compiled_reference")),
        (Case("softmax_ce", "catalogue", rows=8192 // k, n=262_144 // k, dim=128, dtype="bfloat16"),
         ("triton", "linear_cross_entropy", "cce", "liger", "compiled_reference")),
        (Case("infonce", "per_row", rows=4096 // k, n=512, dim=128, dtype="bfloat16"),
         ("triton", "compiled_reference")),
    ]


def _peer(case: Case, impl: str) -> Callable[[dict[str, Tensor]], Tensor]:
    if impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        fn = LigerFusedLinearCrossEntropyLoss()
        return lambda x: fn(x["table"], x["query"], x["target"])
    if impl == "linear_cross_entropy" and not hasattr(torch.nn.functional, "linear_cross_entropy"):
        raise RuntimeError(f"torch {torch.__version__} has no F.linear_cross_entropy")
    return implementation(case, impl)


def _timed(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_case(case: Case, impl: str, repeats: int, device: str = "cuda") -> dict:
    """Median fwd / bwd / fwd+bwd times (ms) and the peak extra memory (MiB) of one forward+backward."""
    x = make_inputs(case, device)
    fn = _peer(case, impl)
    leaves = [t for t in x.values() if t.requires_grad]

    def fwd() -> None:
        with torch.no_grad():
            fn(x)

    def fwdbwd() -> None:
        torch.autograd.grad(fn(x), leaves)

    fwdbwd()  # warm-up: compilation and autotuning stay out of the figures
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    row = {"case": case.label, "impl": impl, "fwdbwd_ms": _timed(fwdbwd)}
    row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    row["fwdbwd_ms"] = statistics.median([row["fwdbwd_ms"], *(_timed(fwdbwd) for _ in range(repeats - 1))])
    row["fwd_ms"] = statistics.median(_timed(fwd) for _ in range(repeats))
    bwd = []
    for _ in range(repeats):
        loss = fn(x)
        bwd.append(_timed(lambda loss=loss: torch.autograd.grad(loss, leaves)))
    row["bwd_ms"] = statistics.median(bwd)
    return row


# --- the command -------------------------------------------------------------------------------


def peers_present(wheels: Path | None = None, install: bool = False) -> dict[str, bool]:
    """Which optional peers import; with ``install``, missing ones are installed from ``wheels``
    (``pip --no-index --no-deps``: no registry is contacted)."""
    present = {}
    for impl, module in PEERS.items():
        if importlib.util.find_spec(module) is None and install and wheels is not None and wheels.is_dir():
            files = sorted(str(p) for p in wheels.glob(f"{PEER_WHEELS[impl].replace('_', '*')}*.whl"))
            if files:
                subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *files],
                               check=False)
                importlib.invalidate_caches()
        present[impl] = importlib.util.find_spec(module) is not None
    return present


def plan_launches(case: Case) -> list[str]:
    """The kernel launches ``backend='triton'`` plans for one forward+backward of ``case``, planned
    on the meta device (no memory, no GPU): 'kernel grid tile' strings."""
    from .._problem import Problem
    from .._spec import Kind, LossSpec
    from ..backends import triton_plan

    x = _meta_inputs(case)
    if case.layout == "catalogue":
        p = Problem("shared", x["query"], x["table"], pos_idx=x["target"])
    else:
        p = Problem(case.layout if case.layout != "catalogue" else "shared", x["query"], x["neg"], x["pos"],
                    neg_idx=x.get("neg_idx"))
    spec = LossSpec(Kind.CONTRASTIVE, eps=0.0 if case.layout == "catalogue" else 1.0)
    row_scale = torch.empty(p.R, device="meta")
    if p.layout == "shared":
        plans = [triton_plan.plan(p, spec, row_scale, (True, True, True), False, emulate_dot=False)]
    else:
        fwd = triton_plan.plan(p, spec, None, (False, False, False), False, emulate_dot=False, save_state=True)
        plans = [fwd, triton_plan.plan(p, spec, row_scale, (True, True, True), False, emulate_dot=False,
                                       state=fwd.state)]
    return [f"{step.name} grid={step.grid} R{step.config.block_r}xN{step.config.block_n}xD{step.config.block_d} "
            f"w{step.config.num_warps} s{step.config.num_stages}" for pl in plans for step in pl.launches]


def _meta_inputs(case: Case) -> dict[str, Tensor]:
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[case.dtype]
    R, N, d = case.rows, case.n, case.dim

    def meta(*shape: int, dtype: torch.dtype = dt) -> Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    if case.layout == "catalogue":
        return {"query": meta(R, d), "table": meta(N, d), "target": meta(R, dtype=torch.int64)}
    x = {"query": meta(R, d), "pos": meta(R, d)}
    if case.layout == "shared":
        x["neg"] = meta(N, d)
    elif case.layout == "per_row":
        x["neg"] = meta(R, N, d)
    else:
        x["neg"], x["neg_idx"] = meta(case.items, d), meta(R, N, dtype=torch.int64)
    return x


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if getattr(args, "out", None) else OUT
    quick = getattr(args, "quick", False)
    dry = getattr(args, "dry_run", False)
    wheels = Path(getattr(args, "wheels", None) or Path(__file__).resolve().parents[2] / "wheels")
    start = time.perf_counter()
    cases, timings = oracle_cases(), timing_cases(quick)
    present = peers_present(wheels, install=not dry)
    lines = [f"# fastrecloss GPU suite{' (dry run: nothing launched)' if dry else ''}", "",
             f"torch {torch.__version__}, triton {_version('triton')}, CUDA available: {torch.cuda.is_available()}"
             + (f", device {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "") + ".",
             f"Peers importable: {', '.join(f'{k}={v}' for k, v in present.items())}; "
             f"F.linear_cross_entropy: {hasattr(torch.nn.functional, 'linear_cross_entropy')}.", ""]
    if dry:
        lines += [f"## Plan: {len(cases)} oracle cases (compiled kernels vs float64 reference)", ""]
        lines += [f"- {c.label}" for c in cases]
        lines += ["", "## Timing cases and their planned launches (meta device)", ""]
        for case, impls in timings:
            lines.append(f"- {case.label}: {', '.join(impls)}")
            lines += [f"  - {launch}" for launch in plan_launches(case)]
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    if not torch.cuda.is_available():
        print("the GPU suite needs a CUDA device (use --dry-run to check the plan on CPU)")
        return 2
    oracle = []
    for case in cases:
        try:
            oracle.append(check_oracle(case, "cuda"))
        except Exception as exc:  # one failing case must not hide the others
            oracle.append({"case": case.label, "ok": False, "error": repr(exc)[:200]})
        print(oracle[-1], flush=True)
    results = []
    for case, impls in timings:
        for impl in impls:
            if impl in PEERS and not present[impl]:
                continue
            try:
                results.append(time_case(case, impl, getattr(args, "repeats", 5)))
            except Exception as exc:
                results.append({"case": case.label, "impl": impl, "error": repr(exc)[:200]})
            torch.cuda.empty_cache()
            print(results[-1], flush=True)
    failed = [r for r in oracle if not r["ok"]]
    lines += [f"## Compiled oracle check: {len(oracle) - len(failed)}/{len(oracle)} pass", ""]
    lines += [f"- FAIL {r['case']}: {r.get('error', r.get('excess'))}" for r in failed]
    lines += ["", "## Timings (median ms, CUDA events; peak extra MiB)", "",
              "| case | impl | fwd | bwd | fwd+bwd | peak MiB |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | error: {r['error']} | | | |")
        else:
            lines.append(f"| {r['case']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | "
                         f"{r['fwdbwd_ms']:.3f} | {r['peak_extra_mib']:.0f} |")
    lines += ["", f"Total time: {time.perf_counter() - start:.0f} s."]
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "oracle.csv", oracle)
    _write_csv(out / "timings.csv", results)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return "absent"


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)

