"""Model-agnostic training machinery shared by the reference models' trainers.

:func:`fit` runs epochs with early stopping on a validation metric, writes a checkpoint after
every epoch (model, optimizer, early-stopping state, best weights and every RNG state) and resumes
from it, so a killed run loses at most the epoch in progress and a resumed run gives the same
result as an uninterrupted one (same seed, same machine and thread count). Also: seeding, JSON
results, a tqdm progress bar, and a peak-memory probe.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

T = TypeVar("T")
CHECKPOINT = "checkpoint.pt"


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a fresh torch.Generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "generators": {k: g.get_state() for k, g in generators.items()}}


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """tqdm progress bar on stderr (disabled when ``enabled`` is False)."""
    return iter(tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, file=sys.stderr,
                     dynamic_ncols=True))


@dataclass
class EarlyStopping:
    """Stop after ``patience`` evaluations without improving ``metric`` (higher is better)."""

    metric: str
    patience: int = 5
    best: float = -math.inf
    best_epoch: int = -1
    bad: int = 0

    def update(self, metrics: dict[str, float], epoch: int) -> bool:
        """Record an evaluation; True when it is the best so far."""
        if self.metric not in metrics:
            raise ValueError(f"early-stopping metric {self.metric!r} is not among {', '.join(metrics)}")
        value = metrics[self.metric]
        if value > self.best:
            self.best, self.best_epoch, self.bad = value, epoch, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs_run: int = 0
    resumed_from: int | None = None
    stopped_early: bool = False


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
        train_epoch: Callable[[int], dict[str, float]], evaluate: Callable[[], dict[str, float]],
        epochs: int, metric: str, patience: int, generators: dict[str, torch.Generator],
        out_dir: str | Path | None = None, resume: bool = False, eval_every: int = 1,
        log: Callable[[str], None] | None = None, fingerprint: dict[str, Any] | None = None) -> FitResult:
    """Train for up to ``epochs`` epochs; at the end ``model`` holds the best validation weights.

    ``train_epoch(epoch)`` trains one epoch and returns its statistics (e.g. the mean loss);
    ``evaluate()`` returns validation metrics and must not consume random numbers. With
    ``out_dir`` a checkpoint is written after every epoch; ``resume`` continues from it and
    refuses a checkpoint whose ``fingerprint`` (the settings that must not change) differs.
    """
    if epochs < 0 or patience < 1 or eval_every < 1:
        raise ValueError(f"need epochs >= 0, patience >= 1, eval_every >= 1; got {epochs}, {patience}, {eval_every}")
    ckpt_path = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    stopper = EarlyStopping(metric, patience)
    best_state = copy.deepcopy(model.state_dict())
    best_valid: dict[str, float] = {}
    history: list[dict[str, Any]] = []
    start, resumed_from = 0, None
    if resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path} (run without --resume first)")
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        changed = {k for k in {*(fingerprint or {}), *ck.get("fingerprint", {})}
                   if (fingerprint or {}).get(k) != ck.get("fingerprint", {}).get(k)}
        if changed:
            k = sorted(changed)[0]
            raise ValueError(f"--resume: {ckpt_path} was written with {k}={ck['fingerprint'].get(k)!r}, "
                             f"now {k}={(fingerprint or {}).get(k)!r}; use another --out or the same settings")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        stopper = EarlyStopping(**ck["stopper"])
        best_state, best_valid, history = ck["best_state"], ck["best_valid"], ck["history"]
        set_rng_state(ck["rng"], generators)
        start = resumed_from = ck["epoch"] + 1
        if log:
            log(f"resumed from {ckpt_path} after epoch {ck['epoch'] + 1}")
    stopped = stopper.should_stop
    for epoch in range(start, epochs):
        if stopped:
            break
        t0 = time.perf_counter()
        model.train()
        record: dict[str, Any] = {"epoch": epoch + 1, **train_epoch(epoch)}
        record["train_seconds"] = time.perf_counter() - t0
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            model.eval()
            valid = evaluate()
            record["valid"] = valid
            if stopper.update(valid, epoch + 1):
                best_state, best_valid = copy.deepcopy(model.state_dict()), valid
            stopped = stopper.should_stop
        history.append(record)
        if log:
            log(_describe(record, metric))
        if ckpt_path is not None:
            _save(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                              "stopper": vars(stopper), "best_state": best_state, "best_valid": best_valid,
                              "history": history, "rng": rng_state(generators), "fingerprint": fingerprint or {}})
    model.load_state_dict(best_state)
    return FitResult(stopper.best_epoch, best_valid, history, len(history), resumed_from, stopped)


def _describe(record: dict[str, Any], metric: str) -> str:
    text = f"epoch {record['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()
                                                    if isinstance(v, float) and k != "train_seconds")
    if "valid" in record:
        text += f", valid {metric} {record['valid'][metric]:.4f}"
    return text + f" ({record['train_seconds']:.1f}s)"


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill during the write leaves the previous checkpoint intact


class PeakMemory:
    """Peak resident-set growth of this process inside a ``with`` block, in bytes (Linux).

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` ← 5) on entry and reads
    ``VmHWM`` on exit, minus the RSS on entry. It counts the whole process (allocator caches
    included), so run one case per process for a clean figure. ``peak`` is None where the
    probe is unavailable.
    """

    def __enter__(self) -> PeakMemory:
        self.peak: int | None = None
        self._start = _status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _status_kib("VmHWM")
        if self._start is not None and hwm is not None:
            self.peak = max(0, hwm - self._start) * 1024


def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None
