"""Training checkpoints: one safetensors file per checkpoint, written atomically, checked on load, never unpickled.

A checkpoint holds everything a run needs to continue as if it had never stopped: the heads (with the
standardisation statistics, which are buffers), both Adam states, the step, the position in the stream (epoch and
batches consumed in it), the loss history, and each rank's RNG states at the start of the current epoch. Resuming
restores those RNG states and replays the consumed batches of that epoch through the loader, without running the
backbone on them, so the data order (and any random augmentation) continues exactly where it stopped.

Files are `checkpoint-<step>.safetensors` in one folder; the newest `keep` are kept. Each is written to a temporary
file, fsynced and renamed into place, so a crash leaves either the old set or the new file whole. Each records the
sha256 of its own tensors and state, so a truncated or corrupted file is detected on load, set aside as
`*.corrupt` and the previous one used. A file that cannot be read (an OSError) or was written by a newer dmm_wrap
is never set aside: the error is raised as it is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..io.serialization import write_bytes_atomically

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)\.safetensors$")


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT / SIGTERM at a step boundary.

    The model keeps the heads of the last complete step (save them with save_pretrained); with checkpoint_dir a
    checkpoint of that step was written (resume continues).

    Example:
        >>> try:
        ...     history = enc.fit(loader, epochs=10)
        ... except TrainingInterrupted as stop:
        ...     history = stop.history  # stop.step steps were taken and are in enc
        ...     enc.save_pretrained("runs/partial")
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None, rank: int = 0, history: Any = None) -> None:
        where = (f"; checkpoint {checkpoint} written, resume to continue" if checkpoint is not None else
                 f"; the model keeps the heads of step {step}: save them with save_pretrained (set checkpoint_dir "
                 "to make the run resumable)")
        super().__init__(f"training interrupted by signal {signum} at step {step}{where}")
        self.signum = signum
        """The signal that stopped training (SIGINT for Ctrl-C)."""
        self.step = step
        """Steps taken; the model holds the heads after the last of them."""
        self.checkpoint = checkpoint
        """The checkpoint written at the stop (None without checkpoint_dir, and on ranks other than 0)."""
        self.rank = rank
        """The rank that raised it (every rank of a data-parallel run does; rank 0 reports it)."""
        self.history = history
        """The `FitHistory` of the steps taken (its steps_done is `step`)."""


class CheckpointCorrupted(ValueError):
    """A checkpoint file whose content is damaged (truncated, unparsable, or not matching its recorded sha256)."""


class CheckpointTooNew(ConfigError):
    """A checkpoint written by a newer dmm_wrap, in a format this version cannot read (upgrade dmm_wrap)."""


@dataclass
class Position:
    """Where a run is: steps taken, the current epoch, and the batches of that epoch already consumed."""

    step: int = 0
    epoch: int = 0
    batches: int = 0


@dataclass
class Checkpoint:
    """A checkpoint read back from disk."""

    path: Path
    position: Position
    heads: dict[str, Tensor]
    optimizers: dict[str, dict[int, dict[str, Tensor]]]
    history: dict[str, Any]
    rng: list[dict[str, Any]]
    fingerprint: dict[str, Any]

    def holds(self, prefix: str) -> bool:
        """Whether the heads hold a part saved under `prefix` (e.g. "h_average.": the run averaged h_theta)."""
        return any(k.startswith(prefix) for k in self.heads)

    def require_same(self, prefix: str, wanted: bool, feature: str, setting: str) -> bool:
        """Whether the part under `prefix` is here; a ValueError with the fix when the resuming run's FitConfig
        (`wanted`: it uses `feature`, as `setting` says) disagrees with the run that wrote the checkpoint."""
        has = self.holds(prefix)
        if has != wanted:
            raise ValueError(f"{self.path} was written by a run {'with' if has else 'without'} {feature}, and this run "
                             f"has {setting}. Resume with the FitConfig of the run that wrote it, or start a new run in "
                             "another checkpoint_dir.")
        return has


# ----------------------------------------------------------------------------- RNG states
def _b64(t: Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def loader_generators(loader: Iterable) -> list[torch.Generator]:
    """The torch.Generators a DataLoader draws its order and worker seeds from (its own and its sampler's)."""
    found: list[torch.Generator] = []
    candidates = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates.append(getattr(getattr(batch_sampler, "sampler", None), "generator", None))
    for g in candidates:
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def capture_rng(loader: Iterable) -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, the loader's generators, Python, NumPy) as JSON values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "loader": [_b64(g.get_state()) for g in loader_generators(loader)],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], base64.b64encode(np_state[1].tobytes()).decode("ascii"), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def restore_rng(state: dict[str, Any], loader: Iterable) -> None:
    """Put back what `capture_rng` recorded."""
    torch.set_rng_state(_unb64(state["torch"]))
    gens = loader_generators(loader)
    if len(gens) != len(state["loader"]):
        raise ValueError(f"The checkpoint recorded {len(state['loader'])} DataLoader generator(s) but this loader has "
                         f"{len(gens)}; resume with the loader the run was started with.")
    for g, s in zip(gens, state["loader"]):
        g.set_state(_unb64(s))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.frombuffer(base64.b64decode(keys), dtype=np.uint32), int(pos), int(has_gauss),
                         cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


# ----------------------------------------------------------------------------- file format
def _digest(tensors: dict[str, Tensor], state_json: str) -> str:
    h = hashlib.sha256(state_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for index, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            if not isinstance(value, Tensor):
                value = torch.tensor(value)
            out[f"{prefix}.{index}.{key}"] = value
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[int, dict[str, Tensor]]) -> None:
    """Load per-parameter state (Adam's moments and step) into `optimizer`, keeping its current param_groups.

    A learning rate changed in the config thus applies on resume.
    """
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _split_optimizer(tensors: dict[str, Tensor], prefix: str) -> dict[int, dict[str, Tensor]]:
    out: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1:].split(".", 1)
            out.setdefault(int(index), {})[key] = value
    return out


class Checkpointer:
    """Writes and finds the checkpoints of one run in `directory`.

    Example:
        >>> ckpt = Checkpointer("runs/digits/checkpoints", every=500)
        >>> ckpt.latest()  # newest checkpoint that reads back intact, or None
    """

    def __init__(self, directory: str | os.PathLike, every: int, keep: int = 2) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every must be an int >= 1, got {every!r}.")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep_checkpoints must be an int >= 1, got {keep!r}.")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint_dir {self.directory} is a file, not a folder; give a folder path (it is "
                             "created if missing).")
        self.every = every
        self.keep = keep
        self._earlier: list[Path] = []

    def paths(self) -> list[Path]:
        """Checkpoint files, newest (highest step) first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def replace_earlier_run(self) -> int:
        """Mark the checkpoints already in the folder as an earlier run's; returns how many.

        The first `save` of this run deletes them (so a later resume cannot pick one of them up), and until then they
        stay resumable.
        """
        self._earlier = self.paths()
        return len(self._earlier)

    def save(self, heads: nn.Module, optimizers: dict[str, torch.optim.Optimizer], position: Position,
             history: dict[str, Any], rng: list[dict[str, Any]], fingerprint: dict[str, Any]) -> Path:
        """Write checkpoint-<step>.safetensors atomically and prune older ones beyond `keep`; return its path."""
        from safetensors.torch import save

        tensors = {f"heads.{k}": v.detach().to("cpu").contiguous().clone() for k, v in heads.state_dict().items()}
        for name, opt in optimizers.items():
            tensors.update({k: v.detach().to("cpu").contiguous().clone()
                            for k, v in _optimizer_tensors(f"optimizer.{name}", opt).items()})
        tensors.update(_history_tensors(history))
        state_json = json.dumps({
            "format": CHECKPOINT_FORMAT, "position": vars(position), "steps_done": history.get("steps_done", 0),
            "club_names": list(history.get("club", {})), "rng": rng, "fingerprint": fingerprint,
            "optimizers": sorted(optimizers),
        })
        blob = save(tensors, metadata={"format": "pt", "dmm_wrap_checkpoint": state_json,
                                       "sha256": _digest(tensors, state_json)})
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".checkpoint-*.tmp"):  # left by a killed save of an older version
            stale.unlink(missing_ok=True)
        final = self.directory / f"checkpoint-{position.step:09d}.safetensors"
        write_bytes_atomically(final, blob)  # cleans up what killed saves left, keeps the usual file mode
        _fsync_dir(self.directory)
        for old in self._earlier:
            if old != final:
                old.unlink(missing_ok=True)
        self._earlier = []
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)
        return final

    @staticmethod
    def read(path: Path) -> Checkpoint:
        """Read one checkpoint.

        A truncated, corrupted or foreign file raises CheckpointCorrupted, one written by a newer dmm_wrap
        CheckpointTooNew (both ValueErrors naming it); an OSError of the read is raised as it is.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load

        data = path.read_bytes()
        try:
            tensors = load(data)
            header_len = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as err:
            raise CheckpointCorrupted(f"{path} is not a readable safetensors file (truncated?): {err}") from err
        state_json = metadata.get("dmm_wrap_checkpoint")
        if state_json is None:
            raise CheckpointCorrupted(f"{path} is not a dmm_wrap training checkpoint.")
        try:
            state = json.loads(state_json)
            version = state.get("format", 0)
        except (ValueError, AttributeError) as err:
            raise CheckpointCorrupted(f"{path} is corrupted: its recorded state is not readable ({err}).") from err
        # Before the sha256: a newer format may record it differently, and its file must not be taken for damaged.
        if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
            raise CheckpointTooNew(f"{path} was written by a newer dmm_wrap (checkpoint format {version!r}; this one "
                                   f"reads up to {CHECKPOINT_FORMAT}). Upgrade dmm_wrap (pip install -U dmm-wrap) to "
                                   "resume from it.")
        if metadata.get("sha256") != _digest(tensors, state_json):
            raise CheckpointCorrupted(f"{path} is corrupted: its content does not match the sha256 recorded when it "
                                      "was written.")
        return Checkpoint(
            path=path, position=Position(**state["position"]),
            heads={k[len("heads."):]: v for k, v in tensors.items() if k.startswith("heads.")},
            optimizers={name: _split_optimizer(tensors, f"optimizer.{name}") for name in state["optimizers"]},
            history=_history_from_tensors(tensors, state["club_names"], state["steps_done"]), rng=state["rng"],
            fingerprint=state["fingerprint"],
        )

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that reads back intact, or None when the folder holds none.

        A damaged newer one (CheckpointCorrupted) is renamed `*.corrupt` with a warning and the previous one tried;
        ValueError when checkpoints exist but all are damaged. A read error (OSError, e.g. a flaky network disk) and
        a checkpoint of a newer dmm_wrap (CheckpointTooNew) are raised as they are, and nothing is renamed."""
        paths = self.paths()
        errors = []
        for path in paths:
            try:
                return self.read(path)
            except CheckpointCorrupted as err:
                errors.append(str(err))
                aside = path.with_name(path.name + ".corrupt")
                try:  # out of the rotation (it would keep a `keep` slot), kept for inspection
                    path.rename(aside)
                except OSError:
                    aside = path
                warnings.warn(f"Skipping checkpoint {path.name} (kept as {aside.name}): {err} Falling back to the "
                              "previous one.", stacklevel=2)
        if paths:
            raise ValueError(f"None of the {len(paths)} checkpoint(s) in {self.directory} is readable: "
                             f"{'; '.join(errors)}. Delete them to start over.")
        return None


_HISTORY_LISTS = ("step", "loss", "debias", "retain", "q_nll", "match", "align", "iso", "select_step", "select_leak")
_INT_LISTS = ("step", "select_step")


def _history_tensors(history: dict[str, Any]) -> dict[str, Tensor]:
    """The loss history as tensors (float64 keeps every Python float exactly); JSON in the header would grow past
    safetensors' header limit on long runs."""
    out = {f"history.{k}": torch.tensor(history.get(k, []), dtype=torch.int64 if k in _INT_LISTS else torch.float64)
           for k in _HISTORY_LISTS}
    for name, values in history.get("club", {}).items():
        out[f"history.club.{name}"] = torch.tensor(values, dtype=torch.float64)
    return out


def _history_from_tensors(tensors: dict[str, Tensor], club_names: list[str], steps_done: int) -> dict[str, Any]:
    # a checkpoint written before a list existed resumes with that list empty
    history: dict[str, Any] = {k: tensors[f"history.{k}"].tolist() for k in _HISTORY_LISTS if f"history.{k}" in tensors}
    history["club"] = {name: tensors[f"history.club.{name}"].tolist() for name in club_names}
    history["steps_done"] = steps_done
    return history


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run whose heads, attributes or number of processes differ from the checkpoint's."""
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff)
        raise ConfigError(f"Cannot resume from {path}: the run differs in {detail}. Resume with the settings the "
                         "checkpoint was written with, or set another checkpoint_dir to start a new run.")


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["Checkpointer", "Checkpoint", "CheckpointCorrupted", "CheckpointTooNew", "Position",
           "TrainingInterrupted", "capture_rng", "restore_rng",
           "check_fingerprint", "load_optimizer_state"]
