"""Capture one module's output with a forward hook, stop the forward there, and pool it to [N, D]."""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from ..config import Pooling


class _StopForward(BaseException):
    """Raised by the hook to skip every layer after the hooked one.

    A BaseException, like KeyboardInterrupt, so that a backbone's own `except Exception` does not swallow it.
    """


def resolve_layer(backbone: nn.Module, layer: str | None) -> nn.Module | None:
    """Return the module named `layer`, or raise a ValueError listing the closest names."""
    if layer is None:
        return None
    modules = dict(backbone.named_modules())
    if layer not in modules or layer == "":
        names = [n for n in modules if n]
        close = difflib.get_close_matches(layer, names, n=5, cutoff=0.4)
        raise ValueError(
            f"Layer {layer!r} is not a module of {type(backbone).__name__}. Closest names: {close}. "
            "Pass any name from backbone.named_modules(), or None for the backbone's output."
        )
    return modules[layer]


def first_tensor(output: Any) -> Tensor:
    """The tensor a module produced: itself, the first element of a tuple/list, or the first value of a mapping."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    if isinstance(output, dict) and output:
        return first_tensor(next(iter(output.values())))
    raise TypeError(f"The hooked module returned {type(output).__name__}, which holds no tensor to use as features.")


def is_channels_last(backbone: nn.Module, target: nn.Module | None) -> bool:
    """Whether `target` (a module of `backbone`, None for its output) gives channels-last maps [N, H, W, C].

    timm marks such models and modules with `output_fmt` "NHWC" (Swin, Swin V2, MambaOut, ...). The hooked module's
    own mark wins; a convolution or batch norm is always channels-first; anything else follows the backbone's mark.
    """
    own = getattr(target, "output_fmt", None) if target is not None else None
    if own is not None:
        return str(getattr(own, "value", own)).upper() == "NHWC"
    if isinstance(target, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
        return False
    fmt = getattr(backbone, "output_fmt", None)
    return fmt is not None and str(getattr(fmt, "value", fmt)).upper() == "NHWC"


def pool(x: Tensor, how: Pooling, channels_last: bool = False) -> Tensor:
    """Pool a module output to [N, D].

    4-D maps [N, C, H, W] ([N, H, W, C] with `channels_last`): "avg"/"max" over H and W; "flatten" keeps
    everything (channels first). 3-D token sequences [N, T, C]: "avg"/"max" over tokens, "cls" takes token 0.
    2-D [N, D] is returned as is.
    """
    if x.dim() == 2:
        return x
    if x.dim() < 2:
        raise ValueError(f"Hooked features must have a batch dimension and at least one more, got shape {tuple(x.shape)}.")
    if channels_last and x.dim() >= 4:
        x = x.movedim(-1, 1)
    if how == "flatten":
        return x.flatten(1)
    if x.dim() == 3:
        if how == "cls":
            return x[:, 0]
        return x.mean(1) if how == "avg" else x.amax(1)
    if how == "cls":
        raise ValueError(f"pool='cls' needs a token sequence [N, T, C]; the hooked layer gives {tuple(x.shape)}.")
    dims = tuple(range(2, x.dim()))
    return x.mean(dims) if how == "avg" else x.amax(dims)


class FeatureExtractor(nn.Module):
    """Run a frozen backbone up to `layer` and return that layer's pooled output [N, D].

    The hook stores the output and raises, so layers after `layer` never run (early exit). The hook is
    registered only for the duration of one forward and removed in `finally`. Threads may share one extractor:
    each forward's hook acts only in the thread that registered it, so concurrent forwards never see (or stop
    on) each other's hooks.

    `channels_last`: whether the hooked layer gives [N, H, W, C] maps; None detects it (`is_channels_last`).
    """

    def __init__(self, backbone: nn.Module, layer: str | None, pool: Pooling = "avg",
                 channels_last: bool | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.layer = layer
        self.pool = pool
        # Kept out of the module tree: it is a submodule of `backbone` already, and registering it again would put
        # its tensors in state_dict (and in every full save) twice.
        self._hooked = (resolve_layer(backbone, layer),)
        if channels_last is not None and not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be True, False or None (detect), got {channels_last!r}.")
        self.channels_last: bool = (is_channels_last(backbone, self._target) if channels_last is None
                                    else channels_last)

    @property
    def _target(self) -> nn.Module | None:
        """The hooked module (None: the backbone's output)."""
        return self._hooked[0]

    @contextmanager
    def _capture(self) -> Iterator[dict[str, Any]]:
        store: dict[str, Any] = {}
        owner = threading.get_ident()

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if threading.get_ident() != owner:  # another thread's forward through the shared backbone
                return
            store["out"] = output
            raise _StopForward

        assert self._target is not None
        handle = self._target.register_forward_hook(hook)
        try:
            yield store
        finally:
            handle.remove()

    def raw(self, x: Tensor) -> Tensor:
        """The hooked module's output before pooling."""
        if self._target is None:
            return first_tensor(self.backbone(x))
        with self._capture() as store:
            try:
                self.backbone(x)
            except _StopForward:
                pass
            if "out" not in store:
                raise RuntimeError(
                    f"The forward pass never reached layer {self.layer!r}; it is not used by {type(self.backbone).__name__}.forward."
                )
            return first_tensor(store.pop("out"))

    def forward(self, x: Tensor) -> Tensor:
        """The hooked layer's output pooled to [N, D]."""
        return pool(self.raw(x), self.pool, self.channels_last)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode whatever `mode`: frozen means frozen (BatchNorm statistics, dropout)."""
        super().train(False)
        return self


__all__ = ["FeatureExtractor", "resolve_layer", "pool", "first_tensor", "is_channels_last"]
