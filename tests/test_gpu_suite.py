"""``fastrecloss bench --suite gpu --dry-run`` on CPU: the plan, the imports, the planned launches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fastrecloss.benchmark import gpu


def test_gpu_suite_dry_run(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "dev.py"), "run", "bench", "--suite", "gpu", "--dry-run",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = (tmp_path / "plan.md").read_text()
    assert "nothing launched" in plan
    assert f"{len(gpu.oracle_cases())} oracle cases" in plan
    for dtype in ("fp32", "bf16", "fp16"):
        for layout in ("shared", "per_row", "indexed", "catalogue"):
            assert f"/{layout}/all/{dtype}" in plan, (layout, dtype)
    # every timing case lists its planned launches: both shared passes, two gathered row passes
    assert plan.count("shared_items_kernel") == 2  # in-batch and catalogue
    assert plan.count("- rows_kernel grid") == 4  # indexed and per-row: forward state pass + gradient pass
    assert not (tmp_path / "report.md").exists()
