"""Every kernel × launch configuration compiles ahead of time for sm_80 and sm_90, no GPU (SPEC §7).

``fastrecloss.backends.triton_aot.run_isolated`` compiles, in a fresh interpreter without TRITON_INTERPRET, exactly the
launches the runtime plans for a representative problem per configuration (every option on, every
gradient), and reads registers and spills from each cubin with ``cuobjdump``. All configurations
are defaults of ``kernels/config.py``, so none may spill.

The default run compiles the cases of one d for one arch (``DEFAULT_DIMS`` × ``DEFAULT_ARCHS``: every
kernel, layout and option set, both dtypes, sm_90 — the arch of the warp-group MMA and SASS checks —
so a spill in a common tile still fails it); the full matrix over every d of ``config.AOT_D``,
``config.AOT_D_GATHERED`` (the gathered K loop) and ``config.AOT_D_SHARED_LOOP`` (the shared K loop)
for sm_80 and sm_90 is the ``aot_full`` marker, which CI runs after the default run (``python3 dev.py
test -m aot_full tests/test_triton_aot.py``). Measured here: the full matrix took 11 min with 2 workers on the shared,
loaded 2-core machine after a kernel change (cold cache for the changed kernels); seconds on a warm
cache.
"""

from __future__ import annotations

import argparse
import itertools

import pytest
import torch
from fastrecloss.kernels import config

from fastrecloss.backends import triton_aot as aot
from fastrecloss.cli import kernels as kernels_cli

KERNELS = {"shared_rows_kernel", "shared_items_kernel", "shared_rows_kernel:merge", "rows_kernel",
           "item_segment_kernel", "segment_merge_kernel", "ranking_kernel"}
DEFAULT_DIMS = (64,)
DEFAULT_ARCHS = (90,)
EVERY_D = tuple(sorted(set(config.AOT_D + config.AOT_D_GATHERED + config.AOT_D_SHARED_LOOP)))


@pytest.fixture(scope="module", params=[pytest.param((DEFAULT_DIMS, DEFAULT_ARCHS), id="d64-sm90"),
                                        pytest.param((EVERY_D, aot.ARCHS), id="every-d",
                                                     marks=pytest.mark.aot_full)])
def aot_matrix(request: pytest.FixtureRequest) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the d, the archs) compiled."""
    return request.param


@pytest.fixture(scope="module")
def aot_dims(aot_matrix: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[int, ...]:
    return aot_matrix[0]


@pytest.fixture(scope="module")
def results(aot_matrix: tuple[tuple[int, ...], tuple[int, ...]]) -> list[aot.Result]:
    dims, archs = aot_matrix
    return aot.run_isolated(("contrastive",), archs, workers=2, sass=True, dims=None if dims == EVERY_D else dims)


def _expected_tiles(dims: tuple[int, ...] = EVERY_D, archs: tuple[int, ...] = aot.ARCHS) -> set[str]:
    """The tile of every configuration the heuristics produce for the AOT shapes of these d and archs."""
    tiles = set()
    for d in (d for d in config.AOT_D + config.AOT_D_SHARED_LOOP if d in dims):
        for dtype in config.AOT_DTYPES:  # d in registers, or the K loop over d
            if d <= config.register_d(dtype) or d in config.AOT_D_SHARED_LOOP:
                for smooth, pairs, arch in itertools.product((False, True), (False, True), archs):
                    if dtype != torch.bfloat16 and smooth:
                        continue
                    for c in config.shared_configs(d, dtype, smooth, pairs, arch):
                        tiles.add(f"R{c.block_r}xN{c.block_n}xD{c.block_d} w{c.num_warps}")
    for d in (d for d in config.AOT_D + config.AOT_D_GATHERED if d in dims):
        for n in config.AOT_N:
            c = config.gathered_config(d, n)
            tiles.add(f"R{c.block_r}xN{c.block_n}xD{c.block_d} w{c.num_warps}")
        c = config.segment_config(d)
        tiles.add(f"R{c.block_r}xN{c.block_n}xD{c.block_d} w{c.num_warps}")
    for d in (d for d in config.AOT_D + config.AOT_D_SHARED_LOOP if d in dims):
        for dtype in config.AOT_DTYPES:  # the merge launch of a split shared rows pass
            if d <= config.register_d(dtype) or d in config.AOT_D_SHARED_LOOP:
                c = config.merge_config(d, dtype)
                tiles.add(f"R{c.block_r}xN{c.block_n}xD{c.block_d} w{c.num_warps}")
    for d in (d for d in config.AOT_D + config.AOT_D_SHARED_LOOP if d in dims):
        for dtype in config.AOT_DTYPES:  # the full-ranking kernel: rank count and every top-k width
            if d <= config.register_d(dtype) or d in config.AOT_D_SHARED_LOOP:
                for k in (None, *config.TOPK_WIDTHS):
                    c = config.ranking_config(d, dtype, k)
                    tiles.add(f"R{c.block_r}xN{c.block_n}xD{c.block_d} w{c.num_warps}")
    return tiles


def test_every_kernel_and_configuration_compiles_for_both_archs(
        results: list[aot.Result], aot_matrix: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    """Every kernel and tile of these d; with both archs (``aot_full``), the same problems for each."""
    aot_dims, archs = aot_matrix
    assert {r.kernel for r in results} == KERNELS
    assert {r.arch for r in results} == {f"sm_{a}" for a in archs}
    # the same problems and kernels for every arch compiled (tiles may differ per arch: strip them)
    by_arch = {arch: {(r.kernel, r.variant.rsplit(" ", 2)[0]) for r in results if r.arch == f"sm_{arch}"}
               for arch in archs}
    assert all(v == by_arch[archs[0]] and v for v in by_arch.values())
    compiled_tiles = {r.variant.rsplit(" ", 2)[-2] + " " + r.variant.rsplit(" ", 1)[-1] for r in results}
    assert compiled_tiles == _expected_tiles(aot_dims, archs)
    assert {int(r.variant.split(" d=")[1].split()[0]) for r in results} == set(aot_dims)
    # every layout, both dtypes of the shared layout, and both indexed item-gradient paths
    variants = " | ".join(r.variant for r in results)
    for label in ("shared contrastive bf16", "shared contrastive fp32", "per_row contrastive",
                  "indexed contrastive bf16 d=", "indexed contrastive bf16 det", "ranking rank float32",
                  "ranking topk k=256 bfloat16", "shared-split contrastive bf16", "shared-split contrastive fp32",
                  "shared-split contrastive-ls bf16",
                  *(f"per_row contrastive bf16 d={d} " for d in config.AOT_D_GATHERED if d in aot_dims),
                  *(f"indexed contrastive bf16 det d={d} " for d in config.AOT_D_GATHERED if d in aot_dims)):
        assert label in variants, label


def test_default_configurations_do_not_spill(results: list[aot.Result]) -> None:
    spilled = [(r.kernel, r.variant, r.arch, r.stack, r.local) for r in results if r.spills]
    assert not spilled, spilled
    assert all(0 < r.regs <= 255 for r in results)
    assert all(r.shared < 100 * 1024 for r in results)  # fits sm_80's 164 KiB with room for two CTAs


def test_kernels_cli_prints_the_table(results: list[aot.Result], monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def fake_run_isolated(kinds, archs, workers, progress=False, sass=False):
        calls.append((kinds, archs, workers))
        return results

    monkeypatch.setattr(aot, "run_isolated", fake_run_isolated)
    parser = argparse.ArgumentParser()
    kernels_cli.add_arguments(parser)
    assert kernels_cli.run(parser.parse_args([])) == 0
    out = capsys.readouterr().out
    assert calls == [(tuple(sorted(aot.KINDS)), aot.ARCHS, calls[0][2])]
    for r in results[:3]:
        assert r.kernel in out and r.variant in out
    assert "0 with spills" in out
    spilled = [aot.Result(**{**r.__dict__, "stack": 8}) if i == 0 else r for i, r in enumerate(results)]
    monkeypatch.setattr(aot, "run_isolated", lambda *a, **k: spilled)
    assert kernels_cli.run(parser.parse_args(["--archs", "80"])) == 1
    assert "SPILL 8 B" in capsys.readouterr().out


# FP32-class instructions per score of the steady-state loop of shared_rows_kernel, bf16, d = 64,
# sm_90, every option on (the AOT case), before the epilogue diet of issue #12 (docs/roofline.md).
FP32_PER_SCORE_BEFORE = 18.75


def test_sass_report_shows_warp_group_mma_and_the_epilogue_diet(results: list[aot.Result]) -> None:
    shared90 = [r for r in results if r.arch == "sm_90" and r.variant.startswith("shared contrastive bf16")]
    assert {r.kernel for r in shared90} == {"shared_rows_kernel", "shared_items_kernel"}
    for r in shared90:  # both passes, every d, wherever the tile's M dimension is 64 (all but the 256-wide
        m = int(r.variant.split(" R")[-1].split("x")[0]) if r.kernel == "shared_rows_kernel" else \
            int(r.variant.split("xN")[-1].split("x")[0])  # accumulator with pair masks: 32 rows — d = 256
        assert (m >= 64) == r.sass["hgmma_in_loop"], (r.kernel, r.variant)  # and the K loop's output chunks)
        assert m >= 64 or ("xD256 " in r.variant and r.kernel == "shared_rows_kernel"), r.variant
    rows64 = next(r for r in shared90 if r.kernel == "shared_rows_kernel" and " d=64 " in r.variant)
    assert rows64.sass["fp32_per_score"] <= 0.7 * FP32_PER_SCORE_BEFORE, rows64.sass
    assert rows64.sass["sfu_per_score"] <= 1.1  # one exp2 per score (the per-row rescale on top)
    assert all(r.sass["loop_instructions"] > 0 and r.sass["cycles_per_1k"] > 0 for r in results)


def test_sass_parser_finds_the_widest_loop_and_classes() -> None:
    from fastrecloss.backends import triton_sass as ts

    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0020*/                   FFMA R2, R3, R4, R5 ;
        /*0030*/                   MUFU.EX2 R6, R2 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   LDG.E R7, [R8.64] ;
        /*0060*/              @!P1 BRA 0x10 ;
        /*0070*/                   EXIT ;
    """
    code = ts.parse(text)
    loop = ts.steady_loop(code)
    assert [i.addr for i in loop] == [0x10, 0x20, 0x30, 0x40, 0x50, 0x60]
    assert [ts.op_class(i.op) for i in loop] == ["mma", "fp32", "sfu", "other", "mem", "other"]
    assert ts.mma_macs(loop[0]) == (64 * 64 * 16 // 4, False)


def test_launch_signature_matches_the_runtime_specialisation() -> None:
    """The AOT signature marks ints equal to 1 as constexpr and 16-divisible ints/pointers as aligned,
    as the JIT does at launch, so the compiled code is the code that runs."""
    from triton.runtime.jit import JITFunction

    _, launches = aot._launches(("contrastive",), 0)
    launch = launches[0]
    if not isinstance(launch.kernel, JITFunction):  # decorated by the interpreter in this process
        launch.kernel = JITFunction(launch.kernel.fn)
    signature, constexprs, attrs = aot._signature(launch)
    names = [p.name for p in launch.kernel.params]
    assert signature["Q"] == "*bf16" and signature["LOSS"] == "*fp32"
    assert signature["stride_qd"] == "constexpr" and constexprs["stride_qd"] == 1
    assert signature["R"] == "i32" and attrs[(names.index("R"),)] == [["tt.divisibility", 16]]
    assert constexprs["KIND"] == 0 and constexprs["DOT_DT"] is not None


def test_split_rows_pass_and_merge_compile_with_warp_group_mma(results: list[aot.Result],
                                                               aot_dims: tuple[int, ...]) -> None:
    """The small-R split rows pass (every option, bf16) keeps HGMMA on sm_90 wherever its tile has 64
    rows, and its merge launch compiled for every d."""
    split90 = [r for r in results if r.arch == "sm_90" and r.variant.startswith("shared-split contrastive bf16")]
    rows = [r for r in split90 if r.kernel == "shared_rows_kernel"]
    merges = [r for r in split90 if r.kernel == "shared_rows_kernel:merge"]
    assert len(rows) == len(merges) == len([d for d in config.AOT_D + config.AOT_D_SHARED_LOOP if d in aot_dims]) > 0
    for r in rows:
        assert r.sass["hgmma_in_loop"] == (int(r.variant.split(" R")[-1].split("x")[0]) >= 64), r.variant
