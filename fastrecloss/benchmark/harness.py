"""Measuring a loss implementation: inputs for a benchmark case, the implementations a user would
pick (ours and the peers), wall time and peak extra memory.

Peak extra memory is measured in a fresh process (``measure_isolated``): on CPU as the growth of
the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs`` after the inputs
exist), on CUDA as ``torch.cuda.max_memory_allocated`` above the inputs. Wall time is the median
of repeated calls after a warm-up (CUDA events on CUDA).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .. import functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One benchmark problem. ``n`` is the shared pool / catalogue size or the negatives per row."""

    loss: str
    layout: str  # shared | per_row | indexed | catalogue
    rows: int
    n: int
    dim: int = 64
    items: int = 0  # table size for the indexed layout
    dtype: str = "float32"
    params: dict = field(default_factory=dict, hash=False)

    @property
    def label(self) -> str:
        size = f"R={self.rows} N={self.n} d={self.dim}" + (f" I={self.items}" if self.items else "")
        return f"{self.loss}/{self.layout} {size} {self.dtype}"


def make_inputs(case: Case, device: str = "cpu", seed: int = 0) -> dict[str, Tensor]:
    """Leaf tensors (requires_grad) for ``case``; embeddings scaled to give O(1) scores."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[case.dtype]

    def emb(*shape: int) -> Tensor:
        return (torch.randn(*shape, generator=g) / case.dim**0.25).to(device=device, dtype=dt).requires_grad_()

    R, N, d = case.rows, case.n, case.dim
    if case.layout == "catalogue":
        return {"query": emb(R, d), "table": emb(N, d),
                "target": torch.randint(0, N, (R,), generator=g).to(device)}
    inputs = {"query": emb(R, d), "pos": emb(R, d)}
    if case.layout == "shared":
        inputs["neg"] = emb(N, d)
    elif case.layout == "per_row":
        inputs["neg"] = emb(R, N, d)
    elif case.layout == "indexed":
        inputs["neg"] = emb(case.items, d)
        inputs["neg_idx"] = torch.randint(0, case.items, (R, N), generator=g).to(device)
    else:
        raise ValueError(f"unknown layout {case.layout!r}")
    return inputs


def _ours(case: Case, backend: str) -> Callable[[dict[str, Tensor]], Tensor]:
    fn = getattr(F, case.loss)

    def run(x: dict[str, Tensor]) -> Tensor:
        if case.layout == "catalogue":
            return fn(x["query"], x["table"], x["target"], backend=backend, **case.params)
        extra = {"neg_idx": x["neg_idx"]} if "neg_idx" in x else {}
        return fn(x["query"], x["pos"], x["neg"], backend=backend, **extra, **case.params)

    return run


def _handwritten(case: Case) -> Callable[[dict[str, Tensor]], Tensor]:
    """What users write by hand: gather + einsum + logsumexp (contrastive) / cross_entropy."""
    if case.layout == "catalogue":
        return lambda x: torch.nn.functional.cross_entropy(x["query"] @ x["table"].T, x["target"])

    def run(x: dict[str, Tensor]) -> Tensor:
        q, p, neg = x["query"], x["pos"], x["neg"]
        if case.layout == "indexed":
            neg = neg[x["neg_idx"]]
        s_neg = q @ neg.T if neg.dim() == 2 else torch.einsum("rd,rnd->rn", q, neg)
        s_pos = (q * p).sum(-1, keepdim=True)
        return -s_pos.squeeze(1).mean() + torch.logsumexp(torch.cat([s_pos, s_neg], 1), 1).mean()

    return run


def implementation(case: Case, impl: str) -> Callable[[dict[str, Tensor]], Tensor]:
    """``impl``: reference | torch | triton | compiled_reference | handwritten | linear_cross_entropy | cce."""
    if impl in ("reference", "torch", "triton"):
        return _ours(case, impl)
    if impl == "compiled_reference":
        return torch.compile(_ours(case, "reference"))
    if impl == "handwritten":
        return _handwritten(case)
    if impl == "linear_cross_entropy":
        if case.layout != "catalogue":
            raise ValueError("linear_cross_entropy is a full-catalogue peer")
        return lambda x: torch.nn.functional.linear_cross_entropy(x["query"], x["table"], x["target"])
    if impl == "cce":
        if case.layout != "catalogue":
            raise ValueError("cut-cross-entropy is a full-catalogue peer")
        from cut_cross_entropy import linear_cross_entropy  # optional extra

        return lambda x: linear_cross_entropy(x["query"], x["table"], x["target"], impl="torch_compile")
    raise ValueError(f"unknown implementation {impl!r}")


def _rss_peak_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _rss_now_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def timed_peak(fn: Callable[[], object]) -> tuple[float, float]:
    """Seconds one call of ``fn`` takes, and the peak resident memory above the start of the call in
    MiB (NaN where the kernel cannot reset the high-water mark)."""
    base = _rss_now_kib() if _reset_peak() else None
    t0 = time.perf_counter()
    fn()
    secs = time.perf_counter() - t0
    return secs, (_rss_peak_kib() - base) / 1024 if base is not None else float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _step(fn: Callable, x: dict[str, Tensor], mode: str) -> None:
    """One timed call: forward only (no grad) or forward + backward."""
    if mode == "fwd":
        with torch.no_grad():
            fn(x)
        return
    torch.autograd.grad(fn(x), [t for t in x.values() if t.requires_grad])


def measure(case: Case, impl: str, *, mode: str = "fwdbwd", repeats: int = 5, warmup: int = 1,
            device: str = "cpu", threads: int | None = None) -> dict:
    """Median wall time (ms) and peak extra memory (MiB) of ``impl`` on ``case`` in this process.

    ``warmup`` calls run first; the memory figure is the peak above the inputs during the next call.
    ``mode``: fwd (no grad), fwdbwd (forward + backward), bwd (backward only, the forward run
    outside the timer). ``threads``: torch's intra-op threads for the call (None: torch's default,
    one per core). On a machine whose cores are busy, the OpenMP threads spin-wait at every parallel
    region for a descheduled peer, which taxes many small ops (the chunked backend) far more than a
    few large ones (the reference): pin the threads there (README, Performance).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = make_inputs(case, device)
    fn = implementation(case, impl)
    leaves = [t for t in x.values() if t.requires_grad]
    cuda = device.startswith("cuda")

    def call() -> float:
        if mode == "bwd":
            loss = fn(x)
            start = _clock(cuda)
            torch.autograd.grad(loss, leaves)
        else:
            start = _clock(cuda)
            _step(fn, x, mode)
        return _elapsed(start, cuda)

    for _ in range(max(1, warmup)):  # lazy initialisation and torch.compile stay out of the figures
        call()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now_kib() * 1024 if _reset_peak() else None
    first = call()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_peak_kib() * 1024 - base if base is not None else float("nan")
    times = [call() for _ in range(repeats)] if repeats else [first]
    return {"case": case.label, "impl": impl, "mode": mode, "time_ms": statistics.median(times),
            "peak_extra_mib": peak / 2**20, "first_ms": first, "device": device, "threads": torch.get_num_threads()}


def _clock(cuda: bool):
    if cuda:
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start
    return time.perf_counter()


def _elapsed(start, cuda: bool) -> float:
    if cuda:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    return (time.perf_counter() - start) * 1e3


def measure_isolated(case: Case, impl: str, *, timeout: float = 1800, **kw) -> dict:
    """``measure`` in a fresh Python process (so one case's allocations cannot hide another's)."""
    payload = json.dumps({"case": asdict(case), "impl": impl, "kw": kw})
    env = dict(os.environ)
    # Every allocation above 128 KiB gets its own mapping and goes back to the OS when freed, so
    # the resident set tracks live memory (glibc would otherwise keep freed heap pages).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "fastrecloss.benchmark.harness", payload], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"case": case.label, "impl": impl, "error": last}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main() -> None:
    parser = argparse.ArgumentParser(description="internal: measure one case in this process")
    parser.add_argument("payload")
    payload = json.loads(parser.parse_args().payload)
    result = measure(Case(**payload["case"]), payload["impl"], **payload["kw"])
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
