"""benchmarks/bench.py --smoke runs end to end and reports every ratio; no timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
RATIOS = ("fit_overhead", "early_exit", "stream_memory", "inference_overhead", "inference_module_overhead")


def test_smoke_reports_all_ratios(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out_json.read_text())
    for name in RATIOS:
        value = result["ratios"][name]
        assert math.isfinite(value) and value > 0, (name, value)
        assert name in proc.stdout
    for key in ("date", "command", "machine"):
        assert result[key]
    assert result["machine"]["torch"] and result["machine"]["threads"] >= 1
    assert "--smoke" in proc.stdout and "torch" in proc.stdout
