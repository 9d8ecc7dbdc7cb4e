"""On-disk format: config.json + model.safetensors (+ README.md, metrics.json, audit.json), written atomically, read
strictly, never unpickled."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
README_NAME = "README.md"
METRICS_NAME = "metrics.json"
AUDIT_NAME = "audit.json"
"""The leakage audit of the saved weights (`dmm_wrap.apps.leakage`), shown in the model card when present."""
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt")
"""Pickled checkpoints that are recognised only to refuse them: unpickling can run arbitrary code."""
MODEL_TYPE = "dmm_wrap.DebiasedEncoder"
FORMAT_VERSION = 1
WEIGHTS_SHA_KEY = "weights_sha256"
"""The key of metrics.json (and config.json) that records the sha256 of the model.safetensors it belongs to."""

_TEMP = re.compile(r"^\..+\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[a-z0-9_]{8}$")
"""Temporary files and folders of our writes: `.<final name>.tmp-<host>-<pid>-<random>`."""
_OLD_TEMP = re.compile(r"^\..+\.tmp-[a-z0-9_]{8}$")
"""The temporary folders older versions left (`.<name>.tmp-<random>`): stale once a day old."""
_OLD_TEMP_AGE_S = 86400


def _host_tag() -> str:
    """8 hex digits naming this machine in temporary names, so that a shared folder's pids are only judged here."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-{_host_tag()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temps(parent: Path) -> None:
    """Remove the temporary files and folders in `parent` that writes killed mid-way left: ours (by their name)
    whose process, on this machine, is gone, and those of older versions once they are a day old."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    host = _host_tag()
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is not None:
            stale = match["host"] == host and not _alive(int(match["pid"]))
        else:
            try:
                stale = bool(_OLD_TEMP.match(entry.name)) and time.time() - entry.stat().st_mtime > _OLD_TEMP_AGE_S
            except OSError:
                continue
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def create_temp_file(directory: Path, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """Create an empty file `prefix<8 random characters>suffix` in `directory`, open for writing (returns its fd and
    path), with the mode a new file gets: 0o666 filtered by the umask, which the kernel applies (tempfile.mkstemp
    makes 0o600 files, and reading the umask means setting it, for every thread of the process)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_"
    for _ in range(100):
        path = directory / (prefix + "".join(secrets.choice(alphabet) for _ in range(8)) + suffix)
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"Could not create a temporary file in {directory}: every name tried exists.")


def new_file_mode(directory: Path) -> int:
    """The permission bits a file newly created in `directory` gets (0o666 less the umask), found by creating one:
    reading the umask with os.umask means setting it, for every thread of the process."""
    fd, probe = create_temp_file(directory, ".mode-probe-")
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, fsync it and os.replace it onto `path`: a crash leaves the
    old file or the new one, whole. The file gets the mode a newly created file gets (the umask is not touched)."""
    path = Path(path)
    clean_stale_temps(path.parent)
    fd, tmp = create_temp_file(path.parent, _temp_prefix(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """`write_bytes_atomically` for text."""
    return write_bytes_atomically(path, text.encode(encoding))


def write_atomically(directory: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Let `writer` fill a temporary folder beside `directory`, then move each file into place with os.replace.

    Each file is swapped in whole, config.json last, so a crash never leaves a half-written file. config.json
    records the sha256 of the weights written with it, so a crash between two swaps (new weights beside the old
    config) is refused on load rather than loaded silently. Temporary folders that killed saves left in the same
    parent are removed first (see `clean_stale_temps`).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(directory.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(directory), dir=directory.parent))
    try:
        writer(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in tmp.iterdir())
        names.sort(key=lambda n: n == CONFIG_NAME)
        mode = new_file_mode(tmp)  # writers may create 0o600 files (safetensors does)
        for name in names:
            if (tmp / name).is_file():
                os.chmod(tmp / name, mode)
            os.replace(tmp / name, directory / name)  # tmp was created with the final mode: the umask is never changed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


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
    """Write `state` to a safetensors file, each tensor as an independent contiguous copy."""
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
    """Write a config.json (indented, keys in their given order)."""
    path.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")


def plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-ready copy of `metrics`: tensors and numpy values become numbers and lists; others raise TypeError."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping {{name: value}}, got {type(metrics).__name__}.")
    return json.loads(json.dumps(dict(metrics), default=_plain))


def write_metrics(metrics: Mapping[str, Any], path: Path) -> None:
    """Write metrics as JSON; tensors and numpy scalars become plain numbers."""
    path.write_text(json.dumps(plain_metrics(metrics), indent=2) + "\n")


def records_other_weights(metrics: Mapping[str, Any] | None, weights_sha256: str | None) -> bool:
    """Whether `metrics` records (under `WEIGHTS_SHA_KEY`) other weights than those whose sha256 is `weights_sha256`;
    metrics that record none (written before dmm_wrap recorded it) are taken as they are."""
    recorded = metrics.get(WEIGHTS_SHA_KEY) if isinstance(metrics, Mapping) else None
    return recorded is not None and weights_sha256 is not None and recorded != weights_sha256


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


__all__ = ["write_bytes_atomically", "write_text_atomically", "create_temp_file", "clean_stale_temps",
           "records_other_weights", "WEIGHTS_SHA_KEY",
           "write_atomically", "file_sha256", "check_weights_match_config", "save_weights", "load_weights", "read_config", "write_config", "check_keys",
           "write_metrics", "read_metrics", "plain_metrics", "require_keys", "CONFIG_NAME", "WEIGHTS_NAME",
           "README_NAME", "METRICS_NAME", "AUDIT_NAME", "PICKLE_NAMES", "MODEL_TYPE", "FORMAT_VERSION"]
