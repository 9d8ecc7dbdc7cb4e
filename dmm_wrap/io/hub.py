"""Hugging Face Hub IO: find a saved model in a folder or a repo, push a saved folder.

Everything goes through huggingface_hub (snapshot_download, HfApi); the token is handed to it and never written.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..version import __version__
from ..config import ConfigError
from .card import is_generated_card, load_audit, load_metrics, model_card
from .serialization import (AUDIT_NAME, CONFIG_NAME, METRICS_NAME, README_NAME, WEIGHTS_NAME, WEIGHTS_SHA_KEY,
                            file_sha256, load_weights, plain_metrics, read_config, records_other_weights, write_metrics)

logger = logging.getLogger(__name__)

UPLOAD_FILES = (CONFIG_NAME, WEIGHTS_NAME, README_NAME, METRICS_NAME, AUDIT_NAME)
"""The files of a saved folder that are downloaded and uploaded; anything else in the folder stays local."""

DEFAULT_COMMIT_MESSAGE = "Upload DeepMinMax debiased encoder"


# --------------------------------------------------------------------------- download
def resolve_pretrained(repo_id_or_dir: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                       token: str | bool | None = None) -> Path:
    """Return the local folder that holds a saved model: the folder itself, or a Hub snapshot.

    A path-like object or an existing folder is used as is. A string that is not a folder is a repo id, fetched
    with `huggingface_hub.snapshot_download` (only config.json, model.safetensors, README.md, metrics.json and
    audit.json).
    `local_files_only=True`, or HF_HUB_OFFLINE=1, reads the Hugging Face cache only.

    Example:
        >>> resolve_pretrained("my-org/debiased-resnet18", revision="v1.0")
    """
    if Path(repo_id_or_dir).is_file():
        raise FileNotFoundError(f"{repo_id_or_dir} is a file; pass the folder written by save_pretrained.")
    if isinstance(repo_id_or_dir, os.PathLike) or Path(repo_id_or_dir).is_dir():
        directory = Path(repo_id_or_dir)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a folder written by save_pretrained.")
        return directory
    repo_id = str(repo_id_or_dir)
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except errors.HFValidationError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor a valid Hub repo id ('org/name'): {err}"
        ) from err
    offline = local_files_only or constants.is_offline_mode() or _env_true("HF_HUB_OFFLINE")
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        snapshot = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline, token=token,
            allow_patterns=list(UPLOAD_FILES), library_name="dmm_wrap", library_version=__version__,
        )
    except errors.LocalEntryNotFoundError as err:
        cache = cache_dir or constants.HF_HUB_CACHE
        reason = ("offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline
                  else "the Hub could not be reached")
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder, and the Hub repo {where} is not in the cache {cache} while {reason}. "
            "Download it once online (unset HF_HUB_OFFLINE, or `hf download REPO_ID`), pass cache_dir= where it "
            "is cached, or pass the path of a folder written by save_pretrained."
        ) from err
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError) as err:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder, and the Hub has no accessible repo {where} "
            f"({type(err).__name__}). Check the name and revision; private or gated repos need token=."
        ) from err
    return Path(snapshot)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


# --------------------------------------------------------------------------- upload
def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                       token: str | None = None, revision: str | None = None,
                       commit_message: str = DEFAULT_COMMIT_MESSAGE, commit_description: str | None = None,
                       create_pr: bool = False, metrics: Mapping[str, Any] | None = None, api: Any = None) -> Any:
    """Upload a folder written by `save_pretrained` to a Hub model repo in one commit.

    The folder is checked first (our config.json, readable weights), so a bad folder creates nothing. Then the
    repo is created if needed (`exist_ok=True`), the branch `revision` too, and config.json, model.safetensors,
    README.md, metrics.json and audit.json are committed with one `upload_folder` call; other files stay local. An
    audit.json or metrics.json of other weights (its weights_sha256 differs) stays local too (with a warning). A
    README.md left as save_pretrained wrote it is uploaded with `repo_id` in its usage snippet, unless the repo
    already has a README.md (checked with `HfApi.file_exists`, as timm's push_to_hf_hub does), which is then left as
    it is; an edited local one is uploaded as it is.

    Args:
        folder: the saved model folder (e.g. a training run's output directory).
        repo_id: "org/name" on the Hub.
        private: visibility of a repo that is created; None keeps the Hub default. An existing repo is unchanged.
        token: a Hub token; None uses the logged-in one. It is passed to huggingface_hub and never written.
        revision: branch to commit to (created from main if missing); None is main.
        commit_message, commit_description: of the commit (or pull request).
        create_pr: open a pull request instead of committing to the branch.
        metrics: {name: value} uploaded as metrics.json (and shown in an untouched card) instead of the folder's
            own metrics.json; the folder itself is not modified. Metrics that record the sha256 of other weights
            (`weights_sha256`, as `dmm-wrap fit` writes it) are refused with a ValueError.
        api: an `huggingface_hub.HfApi` to use (tests pass a fake one); None makes a new one.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit (`.commit_url`, `.pr_url`, `.oid`).

    Example:
        >>> push_folder_to_hub("outputs/run/model", "my-org/debiased-resnet18",
        ...                    metrics=json.loads(Path("outputs/run/metrics.json").read_text()))
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{repo_id!r} is not a valid Hub repo id; use 'org/name' or 'name'. ({err})") from err
    folder = Path(folder)
    config = check_folder(folder)
    new_metrics = plain_metrics(metrics) if metrics is not None else None
    weights_sha = file_sha256(folder / WEIGHTS_NAME)
    if records_other_weights(new_metrics, weights_sha):
        raise ConfigError(
            f"The metrics to push record other weights ({WEIGHTS_SHA_KEY} {new_metrics[WEIGHTS_SHA_KEY][:12]}...) than "
            f"{folder / WEIGHTS_NAME} ({weights_sha[:12]}...): they were measured on another model. Evaluate this "
            "model again (dmm-wrap eval MODEL_DIR CONFIG --output-dir RUN_DIR), or push without those metrics."
        )
    present = [name for name in UPLOAD_FILES if (folder / name).is_file()]
    api = api if api is not None else HfApi(library_name="dmm_wrap", library_version=__version__)
    repo_url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    hub_card = README_NAME in present and api.file_exists(repo_id, README_NAME, repo_type="model",
                                                             revision=revision, token=token)
    with tempfile.TemporaryDirectory(prefix="dmm_wrap-push-") as staging:
        upload_dir, present = _stage(folder, {**config, WEIGHTS_SHA_KEY: weights_sha}, present, repo_id, new_metrics,
                                     Path(staging), hub_card)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=upload_dir, repo_type="model", token=token, revision=revision,
            commit_message=commit_message, commit_description=commit_description, create_pr=create_pr,
            allow_patterns=present,
        )
    url = getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or repo_id
    logger.info("Pushed %s to %s", ", ".join(present), url)
    return commit


def _stage(folder: Path, config: dict[str, Any], present: list[str], repo_id: str,
           metrics: dict[str, Any] | None, staging: Path, hub_card: bool = False) -> tuple[Path, list[str]]:
    """The folder and files to upload: `folder` as it is, or a staging folder of links to its files with a new
    metrics.json (when `metrics` is given) and, when README.md is the card save_pretrained wrote (untouched), that
    card rewritten with `repo_id` in its usage snippet, the metrics and the audit. That card is left out when the
    repo has a card already (`hub_card`)."""
    old_metrics = load_metrics(folder)
    audit = load_audit(folder, config)
    if audit is None and AUDIT_NAME in present:  # the audit of other weights: not uploaded
        present = [name for name in present if name != AUDIT_NAME]
    untouched_card = README_NAME in present and is_generated_card(folder, config, old_metrics, audit)
    if records_other_weights(old_metrics, config.get(WEIGHTS_SHA_KEY)):
        warnings.warn(f"{folder / METRICS_NAME} records other weights than the ones saved beside it; it is left out "
                      "of the upload and of the card. Evaluate the saved model again to push its metrics.",
                      stacklevel=3)
        present = [name for name in present if name != METRICS_NAME]
        old_metrics = None
    if untouched_card and hub_card:
        logger.info("%s already has a README.md: it is kept, and the generated card is not uploaded.", repo_id)
        present = [name for name in present if name != README_NAME]
        untouched_card = False
    if not untouched_card and metrics is None:
        return folder, present
    replaced = {README_NAME} if untouched_card else set()
    if metrics is not None:
        replaced.add(METRICS_NAME)
        write_metrics(metrics, staging / METRICS_NAME)
    for name in present:
        if name not in replaced:
            try:
                os.symlink((folder / name).resolve(), staging / name)
            except OSError:  # no symlinks (Windows without the privilege): copy
                shutil.copy2(folder / name, staging / name)
    if untouched_card:
        (staging / README_NAME).write_text(model_card(config, metrics if metrics is not None else old_metrics,
                                                      repo_id, audit))
    return staging, [name for name in UPLOAD_FILES if (staging / name).is_file()]


def check_folder(folder: Path) -> dict[str, Any]:
    """Check that `folder` holds a loadable save (our config.json, intact weights); return the config."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; save the model with save_pretrained(folder) first.")
    config = read_config(folder / CONFIG_NAME)
    load_weights(folder / WEIGHTS_NAME)
    return config


__all__ = ["resolve_pretrained", "push_folder_to_hub", "check_folder", "UPLOAD_FILES",
           "DEFAULT_COMMIT_MESSAGE"]
