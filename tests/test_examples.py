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


def _readme_block(containing: str) -> str:
    """The README's one Python block that contains `containing`."""
    blocks = [b for b in _python_blocks((ROOT / "README.md").read_text()) if containing in b]
    assert len(blocks) == 1, (containing, len(blocks))
    return blocks[0]


def _replaced(text: str, old: str, new: str) -> str:
    """`text` with its one `old` replaced by `new`; fails when `old` is gone, so an edited README cannot silently run
    the snippet unchanged (20 epochs instead of 1, say)."""
    assert text.count(old) == 1, f"the README snippet holds {text.count(old)} times {old!r}, expected once"
    return text.replace(old, new)


def test_readme_quick_start_runs(tmp_path, monkeypatch) -> None:
    block = _python_blocks((ROOT / "README.md").read_text())[0]
    monkeypatch.chdir(tmp_path)
    images = torch.randn(8, 3, 32, 32)
    attrs = torch.stack([torch.randint(0, 3, (8,)).float(), torch.randn(8)], 1)
    namespace = {"loader": [(images, attrs)], "images": images}
    exec(compile(_replaced(block, "epochs=20", "epochs=1"), "README.md", "exec"), namespace)
    assert namespace["z_tilde"].shape == (8, 128) and namespace["z"].shape == (8, 128)
    assert (tmp_path / "runs/resnet18-site/model.safetensors").is_file()


@pytest.mark.slow
def test_quickstart_example_runs(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["quickstart.py"])
    runpy.run_path(str(ROOT / "examples/quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "DeepMinMax" in out and (tmp_path / "outputs/quickstart/config.json").is_file()
    assert (tmp_path / "outputs/quickstart-aligned/config.json").is_file()
    rows = {line[:16].strip(): [float(v) for v in line[16:].split()] for line in out.splitlines()
            if line.startswith(("raw ", "DeepMinMax ", "alignment head "))}
    majority = float(out.split("majority rate")[1].split()[0])
    assert rows["raw"][1] > 0.9  # negative control: the raw features give the site away
    task, site = rows["alignment head"]
    # The alignment head, fitted on 16,384 images, removes the site for a probe trained on 1,024 images it was not
    # fitted on (measured 0.367, 0.342 with the pooled target; majority rate 0.350, target majority + 0.05) and keeps
    # the task (README, quick start); DeepMinMax does not (1.000).
    assert site <= majority + 0.05 and task >= rows["raw"][0] - 0.02, out


def test_readme_publishing_snippet_runs(tmp_path, monkeypatch) -> None:
    """Quick start, then push -> load from the (faked, offline) Hub cache -> embed -> compile -> ONNX."""
    import shutil

    import huggingface_hub
    from huggingface_hub import HfApi
    from PIL import Image

    quick, publish = _python_blocks((ROOT / "README.md").read_text())[0], _readme_block("push_to_hub(")
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
    monkeypatch.setattr(HfApi, "file_exists", lambda self, repo_id, filename, **kwargs: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = torch.randn(8, 3, 32, 32)
    attrs = torch.stack([torch.randint(0, 3, (8,)).float(), torch.randn(8)], 1)
    pil_images = [Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()) for _ in range(3)]
    namespace = {"loader": [(images, attrs)], "images": images, "pil_images": pil_images}
    exec(compile(_replaced(quick, "epochs=20", "epochs=1"), "README.md", "exec"), namespace)
    trained = namespace["encoder"]
    exec(compile(publish, "README.md", "exec"), namespace)
    assert uploads == ["my-org/resnet18-site-debiased"]
    loaded = namespace["encoder"]
    assert loaded is not trained and torch.equal(loaded(images), trained(images))
    assert namespace["z_tilde"].shape == (3, 128) and (tmp_path / "encoder.onnx").is_file()


def test_readme_audit_snippet_runs(tmp_path, monkeypatch) -> None:
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from dmm_wrap import Attribute, AuditReport, DebiasedEncoder

    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    site, rotation = torch.randint(0, 3, (200,), generator=g), torch.randn(200, generator=g)
    x = torch.randn(200, 6, generator=g)
    x[:, 0] += 3 * site  # the site is plain to see; the rotation is not in x at all
    encoder = DebiasedEncoder(nn.Linear(6, 8), None, [Attribute("site", "categorical", 3),
                                                      Attribute("rotation", "continuous")], input_size=(6,))
    loader = DataLoader(TensorDataset(x, torch.stack([site.float(), rotation], 1)), batch_size=50)
    namespace = {"encoder": encoder, "loader": loader, "features": x.numpy(), "site_ids": site.numpy()}
    exec(compile(_readme_block("audit("), "README.md", "exec"), namespace)
    assert isinstance(namespace["report"], AuditReport)
    assert namespace["report"].verdicts("raw") == {"site": "leaks", "rotation": "removed"}
    assert namespace["other"].verdicts() == {"site": "leaks"}
    assert (tmp_path / "runs/resnet18-site/audit.json").is_file()
