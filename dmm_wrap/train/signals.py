"""Stop signals: SIGINT / SIGTERM end training at a step boundary; the loader's workers leave them to the trainer."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .distributed import is_main_process


class StopSignals:
    """Within the block, SIGINT and SIGTERM ask training to stop at the next step boundary.

    With `checkpointing`, a checkpoint is written first, instead of killing the run mid-step or mid-write. A second
    SIGINT (Ctrl-C twice) stops at once, but after the update in progress (see `deferred`); a third one stops even
    that. Repeated SIGTERMs (schedulers and torchrun both forward them) are ignored. Only the main thread can
    install handlers; elsewhere the block does nothing.
    """

    def __init__(self, enabled: bool, checkpointing: bool = True) -> None:
        self.enabled = enabled
        self.checkpointing = checkpointing
        self.signum: int | None = None
        """The first stop signal received (None: none yet)."""
        self._previous: dict[int, Any] = {}
        self._deferring = False
        self._pending = False

    def __enter__(self) -> StopSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                if self._deferring and not self._pending:
                    self._pending = True  # raised when the update in progress is done
                    return
                raise KeyboardInterrupt
            return
        self.signum = signum
        if is_main_process():
            then = "writing a checkpoint" if self.checkpointing else "keeping the heads of the steps taken"
            print(f"\ndmm_wrap: signal {signum} received; stopping after this step and {then} (Ctrl-C again stops "
                  "at once).", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block (a step's updates of the heads), a second SIGINT raises only at the block's end.

        A stopped run thus never holds half-updated heads; a third SIGINT raises at once.
        """
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class _IgnoreStopSignals:
    """DataLoader worker_init_fn: workers ignore SIGINT / SIGTERM, which the main process handles.

    A scheduler's SIGTERM reaches the whole process group; workers killed by it would fail the next batch fetch.
    """

    def __init__(self, then: Callable[[int], None] | None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


@contextlib.contextmanager
def workers_ignore_stop_signals(loader: Iterable, enabled: bool) -> Iterator[None]:
    """Within the block, the workers a DataLoader starts ignore SIGINT / SIGTERM (its worker_init_fn still runs)."""
    from torch.utils.data import DataLoader

    if not enabled or not isinstance(loader, DataLoader) or loader.num_workers == 0:
        yield
        return
    original = loader.worker_init_fn
    loader.worker_init_fn = _IgnoreStopSignals(original)
    try:
        yield
    finally:
        loader.worker_init_fn = original


__all__ = ["StopSignals", "workers_ignore_stop_signals"]
