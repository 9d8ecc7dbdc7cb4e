"""On-disk format: config.json + model.safetensors (+ README.md, metrics.json, audit.json), written atomically, read
strictly, never unpickled."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
README_NAME = "README.md"
METRICS_NAME = "metrics.json"
AUDIT_NAME = "audit.json"
"""The leakage audit of the saved weights (`dmm_wrap.leakage`), shown in the model card when present."""
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt")
"""Pickled checkpoints that are recognised only to refuse them: unpickling can run arbitrary code."""
MODEL_TYPE = "dmm_wrap.DebiasedEncoder"
FORMAT_VERSION = 1


def write_atomically(directory: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Let `writer` fill a temporary folder beside `directory`, then move each file into place with os.replace.

    Each file is swapped in whole, config.json last, so a crash never leaves a half-written file. config.json
    records the sha256 of the weights written with it, so a crash between two swaps (new weights beside the old
    config) is refused on load rather than loaded silently.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        writer(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in tmp.iterdir())
        names.sort(key=lambda n: n == CONFIG_NAME)
        for name in names:
            move_into_place(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def move_into_place(tmp: Path, final: Path) -> None:
    """os.replace `tmp` onto `final`, first giving it the mode a newly created file gets (temp files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, final)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_match_config(config: dict[str, Any], weights_path: Path) -> None:
    """config.json records the sha256 of the weights saved with it: a mismatched pair (a save interrupted between
    its file swaps, or files copied from two saves) is refused instead of loaded silently."""
    expected = config.get("weights_sha256")
    if expected is not None and file_sha256(weights_path) != expected:
        raise ValueError(
            f"{weights_path} does not belong to the config.json beside it (sha256 differs from its weights_sha256): "
            "the save was interrupted or the files come from different saves. Save the model again."
        )


def save_weights(state: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # Clone so shared/tied storages and non-contiguous views serialise as independent tensors.
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path), metadata=metadata or {"format": "pt"})


def load_weights(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file; a truncated or corrupt one raises an error naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.glob("*") if p.name in PICKLE_NAMES or p.suffix == ".bin")
        if pickles:
            raise ValueError(
                f"{path.parent} holds {pickles} but no {WEIGHTS_NAME}. dmm_wrap loads safetensors only and never "
                "unpickles a checkpoint (unpickling can run arbitrary code). If you trust the file, convert it: "
                "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')."
            )
        raise FileNotFoundError(
            f"No weights file {path}. A saved model folder holds {CONFIG_NAME} and {WEIGHTS_NAME} (dmm_wrap never "
            "loads pickled .bin / .pt checkpoints)."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"The weights file {path} is truncated or corrupt ({err}). Save or download it again.") from err


def write_config(config: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")


def plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-ready copy of `metrics`: tensors and numpy values become numbers and lists; others raise TypeError."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping {{name: value}}, got {type(metrics).__name__}.")
    return json.loads(json.dumps(dict(metrics), default=_plain))


def write_metrics(metrics: Mapping[str, Any], path: Path) -> None:
    """Write metrics as JSON; tensors and numpy scalars become plain numbers."""
    path.write_text(json.dumps(plain_metrics(metrics), indent=2) + "\n")


def read_metrics(path: Path) -> dict[str, Any] | None:
    """The metrics.json at `path` as a dict, or None when there is none."""
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or delete it.") from err
    if not isinstance(metrics, dict):
        raise ValueError(f"{path} must hold a JSON object {{name: value}}, got {type(metrics).__name__}.")
    return metrics


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"Metric value {value!r} of type {type(value).__name__} is not JSON-serialisable.")


def require_keys(config: dict[str, Any], keys: tuple[str, ...], path: Path) -> None:
    """Raise a ValueError naming the keys a config lacks."""
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}; it is incomplete or was edited by hand.")


def read_config(path: Path) -> dict[str, Any]:
    """Read and check a config.json written by dmm_wrap."""
    if not path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {path.parent}; is this a folder written by save_pretrained?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from err
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(
            f"{path} is not a dmm_wrap config (model_type {found!r}, expected {MODEL_TYPE!r}). "
            "Load other models with their own library."
        )
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; this dmm_wrap reads up to {FORMAT_VERSION}. "
            "Upgrade dmm_wrap (pip install -U dmm-wrap)."
        )
    return config


def check_keys(expected: dict[str, Tensor], found: dict[str, Tensor], path: Path) -> None:
    """Strict key and shape check with the offending names in the message."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing keys {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected keys {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}."
        )
    wrong = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if tuple(found[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{path} has tensors of the wrong shape: {wrong[:10]}. Was it saved from another backbone?")


__all__ = ["write_atomically", "file_sha256", "check_weights_match_config", "save_weights", "load_weights", "read_config", "write_config", "check_keys",
           "write_metrics", "read_metrics", "plain_metrics", "require_keys", "CONFIG_NAME", "WEIGHTS_NAME",
           "README_NAME", "METRICS_NAME", "AUDIT_NAME", "PICKLE_NAMES", "MODEL_TYPE", "FORMAT_VERSION"]
