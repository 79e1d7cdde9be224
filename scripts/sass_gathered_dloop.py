"""Static cost of the gathered row passes at awkward d, with the K loop's inner chunk loops weighted.

``fastrecloss kernels --sass`` counts the steady-state (outermost) loop once; in a K-loop kernel
(``D_LOOP``) the chunk loops inside it run ⌈d/BLOCK_D⌉ times per tile, so this script counts the
instructions of the maximal inner loops that many times. Thread-instructions per score, sm_90,
bf16, every option on, N = 1024 (the AOT case of ``triton_aot._meta_problem``); no GPU needed.
Run without TRITON_INTERPRET, on any tree (used on main and on h22 for docs/roofline.md):

    env -u TRITON_INTERPRET .venv/bin/python scripts/sass_gathered_dloop.py 96,192
"""

from __future__ import annotations

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget

from fastrecloss._spec import Kind, LossSpec
from fastrecloss.backends import triton_aot as aot
from fastrecloss.backends import triton_plan
from fastrecloss.backends import triton_sass as ts


def backward_branches(code: list[ts.Instruction]) -> list[tuple[int, int]]:
    out = []
    for ins in code:
        m = ts._BRA.search(ins.operands) if ins.op == "BRA" else None
        if m and int(m.group(1), 16) < ins.addr:
            out.append((int(m.group(1), 16), ins.addr))
    return out


def weighted_counts(code: list[ts.Instruction], trip: int) -> dict[str, int]:
    """Instructions of the widest loop by class, those of its maximal inner loops counted ``trip`` times."""
    loops = backward_branches(code)
    outer = max(loops, key=lambda span: span[1] - span[0])
    inner = [s for s in loops if s != outer and outer[0] <= s[0] and s[1] <= outer[1]]
    inner = [s for s in inner if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in inner)]
    counts: dict[str, int] = {}
    for ins in code:
        if outer[0] <= ins.addr <= outer[1]:
            weight = trip if any(a <= ins.addr <= b for a, b in inner) else 1
            counts[ts.op_class(ins.op)] = counts.get(ts.op_class(ins.op), 0) + weight
    return counts


def main(ds: list[int]) -> None:
    spec = LossSpec(Kind.CONTRASTIVE, eps=1.0)
    for layout in ("per_row", "indexed"):
        for d in ds:
            p = aot._meta_problem(layout, d, 1024, torch.bfloat16)
            plan = triton_plan.plan(p, spec, torch.empty(p.R, device="meta"), (True, True, True), False,
                                    emulate_dot=False, arch=90)
            for name, launch in zip(("state", "gradient"), plan.launches):
                cfg = launch.config
                signature, constexprs, attrs = aot._signature(launch)
                src = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs,
                                                attrs=attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={
                    "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "maxnreg": cfg.maxnreg})
                counts = weighted_counts(ts.disassemble(compiled.asm["cubin"]), -(-d // cfg.block_d))
                per_score = {k: round(v * 32 * cfg.num_warps / (cfg.block_r * cfg.block_n), 1)
                             for k, v in sorted(counts.items())}
                print(json.dumps(dict(layout=layout, d=d, pass_=name, tile=f"R{cfg.block_r}xN{cfg.block_n}"
                                      f"xD{cfg.block_d}", **per_score)), flush=True)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1].split(",")])
