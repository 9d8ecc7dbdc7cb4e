"""README snippets and examples/ are executed so that they cannot rot."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_quick_start_runs(tmp_path, monkeypatch) -> None:
    block = _python_blocks((ROOT / "README.md").read_text())[0]
    monkeypatch.chdir(tmp_path)
    images = torch.randn(8, 3, 32, 32)
    attrs = torch.stack([torch.randint(0, 3, (8,)).float(), torch.randn(8)], 1)
    namespace = {"loader": [(images, attrs)], "images": images}
    exec(compile(block.replace("epochs=20", "epochs=1"), "README.md", "exec"), namespace)
    assert namespace["z_tilde"].shape == (8, 128) and namespace["z"].shape == (8, 128)
    assert (tmp_path / "runs/resnet18-site/model.safetensors").is_file()


@pytest.mark.slow
def test_quickstart_example_runs(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["quickstart.py"])
    runpy.run_path(str(ROOT / "examples/quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "DeepMinMax" in out and (tmp_path / "outputs/quickstart/config.json").is_file()
