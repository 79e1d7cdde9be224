"""Static cost of the shared passes with the K loop over d, inner chunk loops weighted (no GPU).

``fastrecloss kernels --sass`` counts the steady-state (outermost) loop once; with ``D_LOOP`` the
score MMA's chunk loop inside it runs ⌊d/BLOCK_DK⌋ times per tile, and every tile is recomputed by
each of the cdiv(d, BLOCK_D) output-chunk programs. This script weights the maximal inner loops by
their trip count (``sass_gathered_dloop.weighted_counts``) and multiplies by the output chunks, so
the figures are thread-instructions (and MMA MACs) per score of the whole pass, comparable with a
register-path kernel's. ``--force-loop DK,DO`` plans the K loop for a d that would stay in registers
(an A/B of d = 96 or 192). bf16, every option on (the AOT case), sm_80 and sm_90:

    env -u TRITON_INTERPRET .venv/bin/python scripts/sass_shared_dloop.py 64,96,320
    env -u TRITON_INTERPRET .venv/bin/python scripts/sass_shared_dloop.py 96 --force-loop 32,128
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).parent))
from fastrecloss.kernels import config  # noqa: E402
from sass_gathered_dloop import backward_branches  # noqa: E402

from fastrecloss._spec import Kind, LossSpec  # noqa: E402
from fastrecloss.backends import triton_aot as aot  # noqa: E402
from fastrecloss.backends import triton_plan  # noqa: E402
from fastrecloss.backends import triton_sass as ts  # noqa: E402


def weighted_loop(code: list[ts.Instruction], trip: int) -> list[tuple[ts.Instruction, int]]:
    """(instruction, weight) of the widest loop; those of its maximal inner loops weigh ``trip``."""
    loops = backward_branches(code)
    outer = max(loops, key=lambda span: span[1] - span[0])
    inner = [s for s in loops if s != outer and outer[0] <= s[0] and s[1] <= outer[1]]
    inner = [s for s in inner if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in inner)]
    return [(ins, trip if any(a <= ins.addr <= b for a, b in inner) else 1)
            for ins in code if outer[0] <= ins.addr <= outer[1]]


def pass_cost(launch, arch: int, d: int) -> dict:
    cfg = launch.config
    signature, constexprs, attrs = aot._signature(launch)
    src = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={
        "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "maxnreg": cfg.maxnreg})
    looped = launch.args.get("D_LOOP", False)
    trip, chunks = (d // cfg.block_dk, -(-d // cfg.block_d)) if looped else (1, 1)
    scores = cfg.block_r * cfg.block_n
    counts = dict.fromkeys(ts.CLASSES, 0.0)
    macs = {"mma_macs": 0.0, "hmma_macs": 0.0}
    for ins, w in weighted_loop(ts.disassemble(compiled.asm["cubin"]), trip):
        cls = ts.op_class(ins.op)
        counts[cls] += w * 32 * cfg.num_warps * chunks / scores
        if cls == "mma":
            n, tf32 = ts.mma_macs(ins)
            macs["mma_macs" if ins.op == "HGMMA" else "hmma_macs"] += w * n * (2 if tf32 else 1)
    rates = ts.RATES[arch]
    cycles = {"issue": sum(counts.values()) / rates["issue"],
              **{p: counts[p] / rates[p] for p in ("fp32", "int", "sfu", "cvt")},
              "mma": sum(macs[k] * cfg.num_warps * chunks / scores / rates[k] for k in macs)}
    bound = max(cycles, key=cycles.get)
    return dict(tile=f"R{cfg.block_r}xN{cfg.block_n}xD{cfg.block_d}" + (f"xK{cfg.block_dk}" if looped else ""),
                chunks=chunks, **{k: round(v, 2) for k, v in counts.items()},
                mma_cycles_per_1k=round(1000 * cycles["mma"], 1), cycles_per_1k=round(1000 * cycles[bound], 1),
                bound=bound)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dims", help="comma-separated d")
    parser.add_argument("--force-loop", help="BLOCK_DK,BLOCK_D: plan the K loop whatever d is")
    parser.add_argument("--archs", default="80,90")
    args = parser.parse_args(argv)
    if args.force_loop:
        forced = tuple(int(x) for x in args.force_loop.split(","))
        config.shared_chunks = lambda d, dtype: forced  # shared_configs / merge_config read it at call time
    spec = LossSpec(Kind.CONTRASTIVE, eps=1.0)
    for d in (int(x) for x in args.dims.split(",")):
        p = aot._meta_problem("shared", d, 1024, torch.bfloat16)
        for arch in (int(x) for x in args.archs.split(",")):
            plan = triton_plan.plan(p, spec, torch.empty(p.R, device="meta"), (True, True, True), False,
                                    emulate_dot=False, arch=arch, splits=1)
            for launch in plan.launches:
                print(json.dumps(dict(d=d, arch=arch, kernel=launch.name, **pass_cost(launch, arch, d))), flush=True)


if __name__ == "__main__":
    main()
