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


def test_readme_publishing_snippet_runs(tmp_path, monkeypatch) -> None:
    """Quick start, then push -> load from the (faked, offline) Hub cache -> embed -> compile -> ONNX."""
    import shutil

    import huggingface_hub
    from huggingface_hub import HfApi
    from PIL import Image

    quick, publish = _python_blocks((ROOT / "README.md").read_text())[:2]
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "hf-cache"
    uploads: list[str] = []

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs):
        snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
        shutil.copytree(folder_path, snapshot)
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
        uploads.append(repo_id)

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = torch.randn(8, 3, 32, 32)
    attrs = torch.stack([torch.randint(0, 3, (8,)).float(), torch.randn(8)], 1)
    pil_images = [Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()) for _ in range(3)]
    namespace = {"loader": [(images, attrs)], "images": images, "pil_images": pil_images}
    exec(compile(quick.replace("epochs=20", "epochs=1"), "README.md", "exec"), namespace)
    trained = namespace["encoder"]
    exec(compile(publish, "README.md", "exec"), namespace)
    assert uploads == ["my-org/resnet18-site-debiased"]
    loaded = namespace["encoder"]
    assert loaded is not trained and torch.equal(loaded(images), trained(images))
    assert namespace["z_tilde"].shape == (3, 128) and (tmp_path / "encoder.onnx").is_file()
