"""Static cost of a compiled kernel, read from its machine code (``fastrecloss kernels --sass``).

No GPU is needed: the cubin of an AOT compilation (``triton_aot.py``) is disassembled with the
``cuobjdump -sass`` that ships with Triton, the steady-state loop is found (the backward branch
spanning the most instructions — the loop over the item tiles of a row pass, over the row tiles
of an item pass, over a segment's references), and its instructions are counted by class. Every
thread runs each instruction once, so a program of W warps executes ``count·32·W``
thread-instructions per iteration, which covers ``scores`` score elements (BLOCK_R·BLOCK_N for a
tile pass, BLOCK_E for the segment pass): the per-score figures are ``count·32·W / scores`` (one
exp per score is 1.0 SFU instruction per score).

Implied cycles per 1,000 scores on one SM are the largest of the per-pipe times, from the
per-SM throughputs of the CUDA C++ Programming Guide's arithmetic-instruction table (results per
clock per SM) and the dense tensor-core rates of the A100/H100 datasheets:

=============  =======  =======  ==========================================================
pipe           sm_80    sm_90    instructions
=============  =======  =======  ==========================================================
issue          128      128      every instruction (4 schedulers × 1 warp-instruction per clock)
fp32           64       128      FFMA FADD FMUL FMNMX FSEL FSETP FSET FCHK FSWZADD …
int / logic    64       64       IMAD IADD3 LOP3 ISETP SHF LEA SEL PRMT …
sfu            16       16       MUFU (ex2, lg2, rcp)
conversion     16       16       F2F F2FP I2F F2I I2FP
tensor (MACs)  1024     2048     bf16/fp16 MACs per clock per SM (tf32: half); HMMA on sm_90
                                 assumed at the sm_80 rate (mma.sync does not reach HGMMA peak)
=============  =======  =======  ==========================================================

The ``cond`` column gives the loop's instructions that a predicated forward branch inside it can
skip (an ``if`` without ``else``: the shared rows pass's lazy ∂q rescale), out of the loop's total;
the path of an iteration that skips them is the total minus those (``fp32_cond_per_score`` is the
FP32 part).

These are static counts: both sides of a branch inside the loop are counted, latency and memory
stalls are ignored, and the loop is assumed to run at the issue/pipe bound. They stand in for a
timing only as a relative measure between versions of a kernel.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CLASSES = ("mma", "sfu", "fp32", "int", "cvt", "mem", "other")
_FP32 = {"FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK", "FSWZADD", "FMUL32I", "FADD32I",
         "FFMA32I", "FRND"}
_INT = {"IMAD", "IADD3", "IADD", "LOP3", "LOP", "ISETP", "SHF", "SHL", "SHR", "LEA", "LEA_HI", "SEL", "PRMT",
        "IABS", "IMNMX", "VIMNMX", "VIADD", "IMUL", "SGXT", "POPC", "FLO", "BMSK", "PLOP3", "P2R", "R2P", "ICMP"}
_CVT = {"F2F", "F2FP", "F2I", "I2F", "I2FP", "F2IP"}
_MEM = {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "ATOM", "ATOMG", "ATOMS", "RED", "REDG", "LDGSTS", "LD", "ST",
        "LDL", "STL", "UTMALDG", "UTMASTG", "UBLKCP", "LDGDEPBAR"}
_MMA = {"HMMA", "HGMMA", "IMMA", "DMMA", "BMMA", "QGMMA", "IGMMA"}
# warp-instructions per clock per SM, and tensor MACs per clock per SM (16-bit operands)
RATES = {  # thread-instructions per clock per SM; tensor MACs per clock per SM (16-bit operands)
    80: {"issue": 128.0, "fp32": 64.0, "int": 64.0, "sfu": 16.0, "cvt": 16.0, "mma_macs": 1024.0, "hmma_macs": 1024.0},
    90: {"issue": 128.0, "fp32": 128.0, "int": 64.0, "sfu": 16.0, "cvt": 16.0, "mma_macs": 2048.0,
         "hmma_macs": 1024.0},
}
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)((?:\.[\w]+)*)\s*([^;]*);")
_BRA = re.compile(r"0x([0-9a-f]+)")


@dataclass(frozen=True)
class Instruction:
    addr: int
    op: str
    mods: str
    operands: str
    pred: str = ""  # the guard predicate ("@P0", "@!UP1"), empty when unconditional


def disassemble(cubin: bytes) -> list[Instruction]:
    import triton.backends.nvidia as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return parse(text)


def parse(text: str) -> list[Instruction]:
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out.append(Instruction(int(m.group(1), 16), m.group(3), m.group(4), m.group(5).strip(),
                                   (m.group(2) or "").strip()))
    return out


def _target(ins: Instruction) -> int | None:
    m = _BRA.search(ins.operands) if ins.op == "BRA" else None
    return int(m.group(1), 16) if m else None


def conditional_blocks(loop: list[Instruction]) -> list[Instruction]:
    """Instructions of a loop that a predicated forward branch inside it can skip (an ``if`` without
    ``else``, e.g. the lazy ∂q rescale): they run only on the iterations where the branch falls through."""
    skipped: set[int] = set()
    for ins in loop[:-1]:
        target = _target(ins)
        if ins.pred and target is not None and ins.addr < target <= loop[-1].addr:
            skipped.update(range(ins.addr + 1, target))
    return [ins for ins in loop if ins.addr in skipped]


def steady_loop(code: list[Instruction]) -> list[Instruction]:
    """The instructions of the widest loop: [target, branch] of the backward branch spanning most code."""
    best: tuple[int, int] | None = None
    for ins in code:
        target = _target(ins)
        if target is None:
            continue
        if target < ins.addr and (best is None or ins.addr - target > best[1] - best[0]):
            best = (target, ins.addr)
    if best is None:
        return []
    return [ins for ins in code if best[0] <= ins.addr <= best[1]]


def op_class(op: str) -> str:
    if op in _MMA:
        return "mma"
    if op == "MUFU":
        return "sfu"
    if op in _FP32:
        return "fp32"
    if op in _INT:
        return "int"
    if op in _CVT:
        return "cvt"
    if op in _MEM:
        return "mem"
    return "other"


def mma_macs(ins: Instruction) -> tuple[int, bool]:
    """(MACs one warp issues with this MMA, whether it is tf32) from its shape modifier:
    HGMMA.64x32x16 is a warp-group (4-warp) instruction, HMMA.16816 a warp one."""
    tf32 = ".TF32" in ins.mods
    m = re.search(r"\.(\d+)x(\d+)x(\d+)", ins.mods)
    if m:
        a, b, c = map(int, m.groups())
        return a * b * c // 4, tf32
    m = re.search(r"\.(16)(8)(\d+)", ins.mods)
    if m:
        a, b, c = map(int, m.groups())
        return a * b * c, tf32
    return 0, tf32


def loop_cost(cubin: bytes, arch: int, num_warps: int, scores: int) -> dict[str, float | int | bool]:
    """Per-score instruction counts by class of the steady-state loop, and the implied cycles per
    1,000 scores on one SM (see the module docstring)."""
    code = disassemble(cubin)
    loop = steady_loop(code)
    counts = dict.fromkeys(CLASSES, 0)
    macs = {"mma_macs": 0.0, "hmma_macs": 0.0}
    for ins in loop:
        cls = op_class(ins.op)
        counts[cls] += 1
        if cls == "mma":
            n, tf32 = mma_macs(ins)
            macs["mma_macs" if ins.op == "HGMMA" else "hmma_macs"] += n * (2 if tf32 else 1)
    cond = conditional_blocks(loop)
    rates = RATES[arch]
    per_score = {k: v * 32 * num_warps / scores for k, v in counts.items()}
    cond_fp32 = sum(op_class(ins.op) == "fp32" for ins in cond) * 32 * num_warps / scores
    total = sum(per_score.values())
    cycles = {"issue": total / rates["issue"]}
    for pipe in ("fp32", "int", "sfu", "cvt"):
        cycles[pipe] = per_score[pipe] / rates[pipe]
    cycles["mma"] = sum(macs[k] * num_warps / scores / rates[k] for k in macs)
    bound = max(cycles, key=cycles.get)
    return {
        "loop_instructions": len(loop),
        "cond_instructions": len(cond),  # skippable by a forward branch (counted in the totals too)
        **{f"{k}_per_score": round(v, 2) for k, v in per_score.items()},
        "fp32_cond_per_score": round(cond_fp32, 2),
        "hgmma": any(ins.op == "HGMMA" for ins in code),
        "hgmma_in_loop": any(ins.op == "HGMMA" for ins in loop),
        "cycles_per_1k": round(1000 * cycles[bound], 1),
        "bound": bound,
    }


def format_table(rows: list[dict]) -> str:
    header = ("kernel", "variant", "arch", "mma", "sfu", "fp32", "int", "cvt", "mem", "other", "HGMMA",
              "cyc/1k", "bound", "cond")
    body = [(r["kernel"], r["variant"], r["arch"], *(f"{r['sass'][f'{c}_per_score']:.2f}" for c in CLASSES),
             "yes" if r["sass"]["hgmma_in_loop"] else "no", f"{r['sass']['cycles_per_1k']:.0f}", r["sass"]["bound"],
             f"{r['sass'].get('cond_instructions', 0)}/{r['sass']['loop_instructions']}")
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in body]
    return "\n".join(lines)
