"""A forward pre-hook that holds a training run at a known step, so tests can signal it without relying on timing."""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn


class Gate:
    """Blocks the module's call number `at`: writes FOLDER/waiting, then waits (up to 5 minutes) for FOLDER/release."""

    def __init__(self, folder: Path, at: int) -> None:
        self.folder, self.at, self.calls = folder, at, 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.calls += 1
        if self.calls == self.at:
            (self.folder / "waiting").write_text("")
            deadline = time.monotonic() + 300
            while not (self.folder / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
