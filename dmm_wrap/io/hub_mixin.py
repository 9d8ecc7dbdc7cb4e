"""`HubMixin`: save_pretrained / from_pretrained / push_to_hub for an nn.Module, in the style of huggingface_hub's
`ModelHubMixin`: the mixin owns the files, the model class says what its config is and how to build itself from one."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .card import card_was_edited, load_audit, load_metrics, model_card
from .hub import DEFAULT_COMMIT_MESSAGE, push_folder_to_hub, resolve_pretrained
from .serialization import (CONFIG_NAME, METRICS_NAME, README_NAME, WEIGHTS_NAME, WEIGHTS_SHA_KEY, check_keys,
                            check_weights_match_config, file_sha256, load_weights, plain_metrics, read_config,
                            records_other_weights, save_weights, write_atomically, write_config, write_metrics)

ModelT = TypeVar("ModelT", bound="HubMixin")


class HubMixin:
    """save_pretrained / from_pretrained / push_to_hub (config.json, model.safetensors, card, metrics, one Hub commit).

    The class provides `config_dict(heads_only=)` (everything needed to rebuild it, saved as config.json),
    `_check_heads_only()` (raise a ValueError when a heads-only save could not be loaded back) and the classmethod
    `_from_config(config, backbone, path)` (the model a config.json describes, before its weights are loaded).

    Example:
        >>> class DebiasedEncoder(HubMixin, nn.Module): ...
    """

    _trained_prefix: ClassVar[str] = "heads."
    """State-dict prefix of the trained part: what a heads-only save holds."""

    _dropped_prefixes: ClassVar[tuple[str, ...]] = ()
    """State-dict prefixes that saves of earlier versions held and loading ignores."""
    _defaulted_suffixes: ClassVar[tuple[str, ...]] = ()
    """State-dict key endings that saves of earlier versions lack; loading keeps the new model's value for them."""

    def save_pretrained(self, save_directory: str | os.PathLike, *, heads_only: bool = False,
                        metrics: Mapping[str, Any] | None = None) -> Path:
        """Write config.json, model.safetensors and a model card README.md to `save_directory`, atomically.

        Args:
            save_directory: the folder to write (created if needed); files of an earlier save are replaced whole.
            heads_only: save only the trained heads (`heads.*` tensors), as peft saves adapters. The backbone is
                then rebuilt from its spec when loading, so it must be a timm / torchvision backbone with a
                pretrained tag, or a custom module that you pass back with `from_pretrained(..., backbone=)`.
            metrics: {name: value} written to metrics.json, with the sha256 of the weights they describe
                (`weights_sha256`), and shown in the card; None uses the metrics.json already in `save_directory`
                unless it records other weights (then it is left out of the card, with a warning).

        An audit.json already in `save_directory` (`dmm_wrap.audit`) is shown in the card while it audits the weights
        written now (same sha256), and left out otherwise. The card README.md is regenerated only when it is absent
        or is one dmm_wrap generated and nobody edited (recognised by its last line, a marker with its sha256); an
        edited or foreign README.md is kept as it is, with a warning.

        Example:
            >>> enc.save_pretrained("runs/debiased-resnet18", metrics={"site_probe_accuracy": 0.35})
        """
        config = self.config_dict(heads_only=heads_only)
        if heads_only:
            self._check_heads_only()
        state = self.state_dict()
        if heads_only:
            state = {k: v for k, v in state.items() if k.startswith(self._trained_prefix)}
        new_metrics = plain_metrics(metrics) if metrics is not None else None
        folder = Path(save_directory)
        keep_card = card_was_edited(folder)
        if keep_card:
            warnings.warn(f"{folder / README_NAME} was edited (or not written by dmm_wrap): it is kept as it is, so "
                          "its metrics and usage may be stale. Delete it to get a regenerated card.", stacklevel=2)

        def writer(tmp: Path) -> None:
            save_weights(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "weights": config["weights"]})
            saved = {**config, "weights_sha256": file_sha256(tmp / WEIGHTS_NAME)}
            card_metrics = _card_metrics(folder, tmp, new_metrics, saved["weights_sha256"])
            audit = load_audit(folder, saved)  # shown only if it audits these very weights
            if not keep_card:
                (tmp / README_NAME).write_text(model_card(saved, card_metrics, audit=audit))
            write_config(saved, tmp / CONFIG_NAME)

        return write_atomically(save_directory, writer)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, commit_message: str = DEFAULT_COMMIT_MESSAGE,
                    commit_description: str | None = None, create_pr: bool = False, heads_only: bool = False,
                    metrics: Mapping[str, Any] | None = None, api: Any = None) -> Any:
        """Save into a temporary folder and upload it to the Hub repo `repo_id` in one commit.

        The repo is created if needed (`exist_ok=True`). Nothing is created or uploaded when saving fails. The token
        goes to huggingface_hub only; it is never written into the files.

        Args:
            repo_id: "org/name".
            private: visibility of a newly created repo; None keeps the Hub default.
            token: a Hub token; None uses the logged-in one.
            revision: branch to commit to (created if missing); None is main.
            commit_message, commit_description: of the commit (or pull request).
            create_pr: open a pull request instead of committing.
            heads_only, metrics: as in `save_pretrained`.
            api: an `huggingface_hub.HfApi` to use; None makes one.

        Returns:
            The `huggingface_hub.CommitInfo` (`.commit_url`, `.pr_url`).

        Example:
            >>> enc.push_to_hub("my-org/debiased-resnet18", private=True)
        """
        with tempfile.TemporaryDirectory(prefix="dmm_wrap-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", heads_only=heads_only, metrics=metrics)
            return push_folder_to_hub(folder, repo_id, private=private, token=token, revision=revision,
                                      commit_message=commit_message, commit_description=commit_description,
                                      create_pr=create_pr, api=api)

    @classmethod
    def from_pretrained(cls: type[ModelT], repo_id_or_dir: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, backbone: nn.Module | None = None,
                        map_location: str | torch.device = "cpu") -> ModelT:
        """Load a model written by `save_pretrained`, from a folder or a Hugging Face Hub repo.

        A path-like object or an existing folder loads directly. Any other string is a repo id, downloaded with
        huggingface_hub (config.json, model.safetensors, README.md, metrics.json, audit.json) into its cache; offline
        (HF_HUB_OFFLINE=1 or local_files_only=True) only the cache is read. timm and torchvision backbones are
        rebuilt by name; a custom backbone must be passed as `backbone=`. A heads-only save rebuilds the backbone
        with its pinned pretrained weights (a download) unless `backbone=` is given. Weights are read from
        safetensors only (never unpickled), with strict key and shape checks.

        Args:
            repo_id_or_dir: a folder, or "org/name" on the Hub.
            revision: branch, tag or commit of the repo; None is main.
            cache_dir: the Hugging Face cache to use; None is the default (HF_HUB_CACHE).
            local_files_only: never touch the network.
            token: for private or gated repos; never stored.
            backbone: the backbone module (required for custom backbones; its weights are overwritten by a full save).
            map_location: device of the returned model.

        Example:
            >>> enc = DebiasedEncoder.from_pretrained("my-org/debiased-resnet18", revision="v1.0")
        """
        directory = resolve_pretrained(repo_id_or_dir, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, token=token)
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            load_weights(weights_path)  # raises: missing, or a pickle checkpoint that is refused
        config = read_config(directory / CONFIG_NAME)
        state = load_weights(weights_path)
        state = {k: v for k, v in state.items() if not k.startswith(cls._dropped_prefixes)}
        model = cls._from_config(config, backbone, directory / CONFIG_NAME)
        heads_only = config.get("weights", "full") == "heads_only"
        expected = model.state_dict()
        if heads_only:
            expected = {k: v for k, v in expected.items() if k.startswith(cls._trained_prefix)}
        state = {**{k: v for k, v in expected.items() if k.endswith(cls._defaulted_suffixes) and k not in state},
                 **state}
        check_keys(expected, state, weights_path)
        check_weights_match_config(config, weights_path)  # after the key checks, whose messages say more
        model.load_state_dict(state, strict=not heads_only)
        return model.to(map_location).eval()


def _card_metrics(folder: Path, tmp: Path, metrics: dict[str, Any] | None, weights_sha: str) -> dict[str, Any] | None:
    """The metrics of the card: `metrics` (written to metrics.json in `tmp` with `weights_sha`), else those of the
    folder's metrics.json unless it records other weights (then none, with a warning)."""
    if metrics is not None:
        recorded = {**metrics, WEIGHTS_SHA_KEY: weights_sha}
        write_metrics(recorded, tmp / METRICS_NAME)
        return recorded
    old = load_metrics(folder)
    if records_other_weights(old, weights_sha):
        warnings.warn(f"{folder / METRICS_NAME} records other weights than the ones saved now; it is left out of the "
                      "model card. Pass metrics= to record those of these weights.", stacklevel=5)
        return None
    return old


__all__ = ["HubMixin"]
