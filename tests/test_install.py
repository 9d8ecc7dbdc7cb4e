"""A base install (`pip install dmm-wrap`, no extras): `dmm-wrap fit` runs, and says which extra adds what it skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "synthetic_digits.yaml")
OPTIONAL = ("matplotlib", "concept_erasure", "datasets", "onnx", "onnxscript", "onnxruntime", "ot", "pytest")
"""Top-level modules of the packages in pyproject's optional-dependencies, none of them in `dependencies`."""

BASE_INSTALL = textwrap.dedent("""
    import importlib.abc
    import sys

    HIDDEN = set(sys.argv[1].split(","))

    class HideExtras(importlib.abc.MetaPathFinder):
        # wraps one finder of sys.meta_path: the hidden packages are not found, as if not installed

        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN or not hasattr(self.finder, "find_spec"):
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, name):  # invalidate_caches, find_distributions (package metadata), ...
            return getattr(self.finder, name)

    for name in list(sys.modules):
        if name.split(".")[0] in HIDDEN:
            del sys.modules[name]
    sys.meta_path[:] = [HideExtras(finder) for finder in sys.meta_path]
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("the finder did not hide matplotlib")

    from dmm_wrap.apps.cli import main

    status = main(sys.argv[2:])
    leaked = sorted({n.split(".")[0] for n in sys.modules} & HIDDEN)
    if leaked:
        raise SystemExit(f"hidden modules were imported: {leaked}")
    raise SystemExit(status)
""")


@pytest.mark.slow
def test_fit_runs_on_a_base_install_and_names_the_extras(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", BASE_INSTALL, ",".join(OPTIONAL), "fit", DEFAULT, "--max-steps", "5",
           "--output-dir", str(out), "--set", "fit.progress=false", "--set", "method=deepminmax"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("metrics.json", "report.md", "model/config.json", "model/model.safetensors", "history.json"):
        assert (out / name).is_file(), name
    assert not (out / "tsne.png").exists() and not (out / "training_curves.png").exists()
    skipped = [line for line in proc.stderr.splitlines() if "pip install 'dmm-wrap[report]'" in line]
    assert len(skipped) == 1 and "tsne.png" in skipped[0] and "training_curves.png" in skipped[0], proc.stderr
    assert any("pip install 'dmm-wrap[eval]'" in line and "LEACE" in line for line in proc.stderr.splitlines())
    methods = json.loads((out / "metrics.json").read_text())["methods"]
    assert list(methods) == ["raw", "dmm"]  # LEACE skipped, the run itself complete
    assert isinstance(methods["dmm"]["task_accuracy"], float)
    report = (out / "report.md").read_text()
    assert "![tsne](tsne.png)" not in report and "dmm-wrap[report]" in report  # the note says why
