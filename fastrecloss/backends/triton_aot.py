"""Ahead-of-time compilation of every kernel × launch configuration for sm_80 and sm_90, no GPU.

Each case is a representative problem on the ``meta`` device (no memory) with every option on
(logQ, positive logQ, an [R, N] mask, accidental hits, positives as table rows where the layout
allows it, every gradient). :func:`fastrecloss.backends.triton_plan.plan` turns it into exactly the launches the
runtime would make; each launch is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cap, 32))`` and its cubin is read with ``cuobjdump
--dump-resource-usage`` (shipped with Triton): ``REG`` registers per thread, ``STACK``/``LOCAL``
bytes (> 0 means spills), plus the shared memory Triton reserves.

The configurations are the tiles the heuristics of ``kernels/config.py`` give for
``AOT_D`` × ``AOT_DTYPES`` (shared) and ``AOT_D`` + ``AOT_D_GATHERED`` × ``AOT_N`` (per-row, indexed,
segment passes; the second set of d runs the K loop over d) —
all of them are *default* configurations, and the test suite asserts zero spills for each.

Kernels must be decorated without ``TRITON_INTERPRET``; :func:`run_isolated` therefore runs the
compilation in a fresh interpreter (``python -m fastrecloss.backends.triton_aot --json``) with that
variable removed, which is what the CLI and the tests call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

KINDS = {"contrastive": 0, "bpr": 1, "bce": 2, "ccl": 3}
ARCHS = (80, 90)
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.int8: "i8"}


@dataclass(frozen=True)
class Result:
    kernel: str
    variant: str  # layout, kind, dtype and the launch configuration
    arch: str
    regs: int
    stack: int
    local: int
    shared: int
    sass: dict | None = None  # steady-state loop cost (``triton_sass.loop_cost``), with ``--sass``

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def _meta_problem(layout: str, d: int, n: int, dtype: torch.dtype):
    """A problem of tensors on the meta device (shapes only) with every option on."""
    from .._problem import Problem

    R, items = 256, 4096

    def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    ids = empty(R, dtype=torch.int64)
    common = dict(query=empty(R, d, dtype=dtype), pos_log_q=empty(R), neg_mask=empty(R, n, dtype=torch.bool),
                  hit_pos_ids=ids, temperature=0.5)
    if layout == "shared":
        return Problem("shared", neg=empty(n, d, dtype=dtype), pos_idx=ids, log_q=empty(n),
                       hit_neg_ids=empty(n, dtype=torch.int64), **common)
    if layout == "per_row":
        return Problem("per_row", neg=empty(R, n, d, dtype=dtype), pos=empty(R, d, dtype=dtype), log_q=empty(R, n),
                       hit_neg_ids=empty(R, n, dtype=torch.int64), **common)
    neg_idx = empty(R, n, dtype=torch.int64)
    return Problem("indexed", neg=empty(items, d, dtype=dtype), neg_idx=neg_idx, pos_idx=ids, log_q=empty(items),
                   hit_neg_ids=neg_idx, **common)


def cases(kinds: tuple[str, ...] = ("contrastive",)) -> list[tuple[str, Any, Any, bool]]:
    """(label, problem, spec, deterministic) for every configuration of :mod:`kernels.config`."""
    from .._problem import Problem
    from .._spec import Kind, LossSpec
    from ..kernels.config import AOT_D, AOT_D_GATHERED, AOT_D_SHARED_LOOP, AOT_DTYPES, AOT_N, register_d

    out = []
    for kind in kinds:
        spec = LossSpec(Kind(KINDS[kind]), eps=1.0)
        for d in sorted(set(AOT_D + AOT_D_GATHERED + AOT_D_SHARED_LOOP)):  # the last two: the K loops over d
            for dtype in AOT_DTYPES:  # shared: d in registers (AOT_D), or the K loop over d (AOT_D_SHARED_LOOP)
                if not (d <= register_d(dtype) if d in AOT_D else d in AOT_D_SHARED_LOOP):
                    continue
                out.append((f"shared {kind} {_TYPES[dtype]}", _meta_problem("shared", d, 1024, dtype), spec, False))
            for n in AOT_N if d in AOT_D + AOT_D_GATHERED else ():
                out.append((f"per_row {kind} bf16", _meta_problem("per_row", d, n, torch.bfloat16), spec, False))
                for det in (False, True):
                    label = f"indexed {kind} bf16{' det' if det else ''}"
                    out.append((label, _meta_problem("indexed", d, n, torch.bfloat16), spec, det))
        if kind == "contrastive":  # in-batch (hits only), and label smoothing + z-loss (SMOOTH)
            for d in AOT_D + AOT_D_SHARED_LOOP[:1]:  # the K loop's option variants at its first d
                ids = torch.empty(256, dtype=torch.int64, device="meta")
                q = torch.empty(256, d, dtype=torch.bfloat16, device="meta")
                in_batch = Problem("shared", q, torch.empty_like(q), pos_idx=ids, hit_pos_ids=ids, hit_neg_ids=ids,
                                   log_q=torch.empty(256, device="meta"), temperature=0.5)
                out.append((f"shared {kind}-inbatch bf16", in_batch, spec, False))
                catalogue = Problem("shared", q, torch.empty(4096, d, dtype=torch.bfloat16, device="meta"), pos_idx=ids)
                out.append((f"shared {kind}-catalogue bf16", catalogue, LossSpec(Kind.CONTRASTIVE), False))
            smooth = LossSpec(Kind.CONTRASTIVE, eps=1.0, label_smoothing=0.1, z_loss=1e-4)
            for d in AOT_D + AOT_D_SHARED_LOOP[:1]:
                out.append((f"shared {kind}-ls bf16", _meta_problem("shared", d, 1024, torch.bfloat16), smooth, False))
                plain = _meta_problem("shared", d, 1024, torch.bfloat16)  # catalogue: no per-pair mask
                plain = dataclasses.replace(plain, neg_mask=None, hit_pos_ids=None, hit_neg_ids=None)
                out.append((f"shared {kind}-ls-nomask bf16", plain, smooth, False))
            for det in (False, True):
                out.append((f"indexed {kind}-ls bf16{' det' if det else ''}",
                            _meta_problem("indexed", 128, 1024, torch.bfloat16), smooth, det))
    return out


def _signature(launch) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int, ...], Any]]:
    """Signature, constexprs and attributes exactly as the runtime JIT would specialise this launch
    (ints equal to 1 become constexprs, ints and pointers divisible by 16 get ``tt.divisibility``)."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(launch.kernel.params):
        value = launch.args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        ty, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[param.name] = value
        elif isinstance(spec, str):
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs


def _resources(cubin: bytes) -> dict[str, int]:
    import triton.backends.nvidia as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {key: int(val) for key, val in re.findall(r"(REG|STACK|LOCAL):(\d+)", line)}


def _launches(kinds: tuple[str, ...], case: int, cap: int = 90) -> tuple[str, list]:
    """The launches the runtime would make on an sm_``cap`` GPU for case number ``case`` of :func:`cases`."""
    from . import triton_plan as launch_mod

    base = cases(kinds)
    if case >= len(base):  # kernels planned outside triton_plan (the hook of _extra_cases), the split rows pass
        extra = _extra_cases()
        if case - len(base) < len(extra):
            return extra[case - len(base)]
        return split_cases(kinds, cap)[case - len(base) - len(extra)]
    label, problem, spec, det = base[case]
    plan = launch_mod.plan(problem, spec, torch.empty(problem.R, device="meta"), (True, True, True), det,
                           emulate_dot=False, arch=cap, splits=1)  # one program per row block: large R
    return f"{label} d={problem.d} N={problem.N}", plan.launches


def split_cases(kinds: tuple[str, ...], cap: int = 90) -> list[tuple[str, list]]:
    """(label, launches) of the shared layout's split-N rows pass and its merge kernel (small R): the
    every-option shared problems of :func:`cases` (and label smoothing with a per-pair mask) planned
    for a GPU of ``kernels.config.SM_COUNT`` SMs, where their 4–8 row blocks make the rows pass split
    the items (the base cases plan the same problems unsplit, as for large R)."""
    from . import triton_plan as launch_mod

    out = []
    for label, problem, spec, det in cases(kinds):
        if label.startswith("shared") and ("inbatch" not in label and "catalogue" not in label
                                           and "nomask" not in label):
            plan = launch_mod.plan(problem, spec, torch.empty(problem.R, device="meta"), (True, True, True), det,
                                   emulate_dot=False, arch=cap)
            split = [s for s in plan.launches if s.name == "shared_rows_kernel:merge" or s.args.get("SPLIT")]
            if split:
                out.append((f"{label.replace('shared', 'shared-split', 1)} d={problem.d} N={problem.N}", split))
    return out


def _extra_cases() -> list[tuple[str, list]]:
    """(label, launches) of kernels with their own planner: the full-ranking kernel (``backends/ranking.py``)."""
    from .ranking import aot_cases

    return aot_cases()


def scores_per_iteration(launch: Any) -> int:
    """Score elements one iteration of the kernel's steady-state loop covers (one tile, or one
    reference per lane of the segment pass)."""
    cfg = launch.config
    if launch.name == "shared_rows_kernel:merge":  # one partial row state (and its d floats) per row and split
        return cfg.block_r
    lanes = launch.name in ("item_segment_kernel", "segment_merge_kernel")  # a reference / a partial per lane
    return cfg.block_r if lanes else cfg.block_r * cfg.block_n


def compile_launch(launch: Any, cap: int, variant: str = "", sass: bool = False) -> Result:
    """Compile one planned launch for sm_``cap`` and read its resource usage (and, with ``sass``,
    the static cost of its loop) from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget

    cfg = launch.config
    signature, constexprs, attrs = _signature(launch)
    src = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "maxnreg": cfg.maxnreg}
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    res = _resources(compiled.asm["cubin"])
    variant = f"{variant} R{cfg.block_r}xN{cfg.block_n}xD{cfg.block_d} w{cfg.num_warps}".strip()
    cost = None
    if sass:
        from .triton_sass import loop_cost

        cost = loop_cost(compiled.asm["cubin"], cap, cfg.num_warps, scores_per_iteration(launch))
    return Result(launch.name, variant, f"sm_{cap}", res["REG"], res["STACK"], res["LOCAL"],
                  int(compiled.metadata.shared), cost)


def _compile(job: tuple[tuple[str, ...], int, int, int, bool]) -> Result:
    """Compile launch ``index`` of case ``case`` for sm_``cap`` (a picklable job for worker processes)."""
    kinds, case, index, cap, sass = job
    label, launches = _launches(kinds, case, cap)
    return compile_launch(launches[index], cap, label, sass)


def jobs(kinds: tuple[str, ...], archs: tuple[int, ...], sass: bool = False,
         dims: tuple[int, ...] | None = None) -> list[tuple[tuple[str, ...], int, int, int, bool]]:
    """Distinct (kinds, case, launch index, arch) to compile: one per kernel specialisation and tile
    (``dims``: only the cases of those embedding dimensions d)."""
    from . import triton_plan as launch_mod

    if type(launch_mod.shared_rows_kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("AOT compilation needs the kernels decorated without TRITON_INTERPRET; use run_isolated()")
    seen, out = set(), []
    for case in range(len(cases(kinds)) + len(_extra_cases()) + len(split_cases(kinds))):
        for cap in archs:
            label, launches = _launches(kinds, case, cap)
            if dims is not None and int(re.search(r" d=(\d+)", label).group(1)) not in dims:
                break
            for index, step in enumerate(launches):
                key = (step.name, repr(_signature(step)), step.config, cap)
                if key not in seen:
                    seen.add(key)
                    out.append((kinds, case, index, cap, sass))
    return out


def compile_all(kinds: tuple[str, ...] = ("contrastive",), archs: tuple[int, ...] = ARCHS,
                workers: int = 1, sass: bool = False, dims: tuple[int, ...] | None = None) -> Iterator[Result]:
    """Compile every job of :func:`jobs`, yielding results in job order as they complete."""
    todo = jobs(kinds, archs, sass, dims)
    if workers <= 1:
        yield from map(_compile, todo)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_compile, todo)


def run_isolated(kinds: tuple[str, ...] = ("contrastive",), archs: tuple[int, ...] = ARCHS, workers: int = 1,
                 progress: bool = False, sass: bool = False, dims: tuple[int, ...] | None = None) -> list[Result]:
    """:func:`compile_all` in a fresh Python without TRITON_INTERPRET (streamed back as JSON lines)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastrecloss.backends.triton_aot", "--jsonl", "--workers", str(workers),
           "--kinds", *kinds, "--archs", *map(str, archs), *(["--sass"] if sass else []),
           *(["--dims", *map(str, dims)] if dims is not None else [])]
    results: list[Result] = []
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err,
                                                               text=True) as proc:
        bar = None
        for line in proc.stdout:
            row = json.loads(line)
            if "total" in row:
                bar = tqdm(total=row["total"], desc="compiling", unit="kernel", disable=not progress)
                continue
            results.append(Result(**row))
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        if proc.wait() != 0:
            err.seek(0)
            raise RuntimeError(f"AOT compilation failed:\n{err.read()[-4000:]}")
    return results


def format_table(results: list[Result]) -> str:
    header = ("kernel", "variant", "arch", "regs", "spill B", "smem B")
    rows = [(r.kernel, r.variant, r.arch, str(r.regs), str(r.stack + r.local), str(r.shared)) for r in results]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["contrastive"], choices=sorted(KINDS))
    parser.add_argument("--archs", nargs="+", type=int, default=list(ARCHS))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--jsonl", action="store_true", help="print the job count, then one JSON line per result")
    parser.add_argument("--sass", action="store_true", help="also count the steady-state loop's instructions")
    parser.add_argument("--dims", nargs="+", type=int, help="only the cases of these d (default: every AOT_D)")
    args = parser.parse_args(argv)
    kinds, archs, dims = tuple(args.kinds), tuple(args.archs), tuple(args.dims) if args.dims else None
    if not args.jsonl:
        print(format_table(list(compile_all(kinds, archs, args.workers, args.sass, dims))))
        return 0
    print(json.dumps({"total": len(jobs(kinds, archs, args.sass, dims))}), flush=True)
    for result in compile_all(kinds, archs, args.workers, args.sass, dims):
        print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
