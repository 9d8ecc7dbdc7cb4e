"""Hugging Face Hub IO: find a saved model in a folder or a repo, write its model card, push a saved folder.

Everything goes through huggingface_hub (snapshot_download, HfApi); the token is handed to it and never written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import __version__
from .config import ConfigError
from .serialization import (AUDIT_NAME, CONFIG_NAME, METRICS_NAME, README_NAME, WEIGHTS_NAME, WEIGHTS_SHA_KEY,
                            file_sha256, load_weights, plain_metrics, read_config, read_metrics,
                            records_other_weights, write_metrics)

logger = logging.getLogger(__name__)

UPLOAD_FILES = (CONFIG_NAME, WEIGHTS_NAME, README_NAME, METRICS_NAME, AUDIT_NAME)
"""The files of a saved folder that are downloaded and uploaded; anything else in the folder stays local."""

DEFAULT_COMMIT_MESSAGE = "Upload DeepMinMax debiased encoder"

_CARD_MARK = re.compile(r"<!-- dmm_wrap model card, sha256 (?P<sha>[0-9a-f]{64}): [^\n]*-->\n?\Z")
"""The last line of a card dmm_wrap generated: the sha256 of the text above it, so that an edit is recognised."""


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


# --------------------------------------------------------------------------- model card
def model_card(config: dict[str, Any], metrics: Mapping[str, Any] | None = None, repo_id: str | None = None,
               audit: Mapping[str, Any] | None = None) -> str:
    """The README.md of a saved model: YAML metadata for the Hub, a description, the metrics, the leakage audit (when
    one is given) and a usage snippet.

    Args:
        config: the model's config.json content (`DebiasedEncoder.config_dict()`).
        metrics: {name: value}, nested mappings allowed; rendered as a table.
        repo_id: used in the usage snippet; None writes a placeholder.
        audit: the content of an audit.json (`dmm_wrap.leakage.AuditReport.to_dict()`); None leaves the section out.
    """
    from huggingface_hub import ModelCard, ModelCardData

    spec = config["backbone"]
    source, arch, tag = spec.get("source"), spec.get("name"), spec.get("pretrained_tag")
    base_model, license_ = _base_model(source, arch, tag)
    tags = ["dmm_wrap", "debiasing", "deepminmax", "fairness", "feature-extraction"]
    if source in ("timm", "torchvision"):
        tags += [source, "image-feature-extraction"]
    data = ModelCardData(library_name="dmm_wrap", tags=tags, base_model=base_model, license=license_,
                         pipeline_tag="image-feature-extraction" if source in ("timm", "torchvision") else None)
    heads_only = config.get("weights") == "heads_only"
    backbone = f"{source}:{arch}" + (f" with pretrained weights `{tag}`" if tag else " (weights in this repo)")
    if source == "custom":
        backbone = f"a custom `{arch}` module"
    name = repo_id.split("/")[-1] if repo_id else f"DeepMinMax {arch}"
    attrs = "\n".join(f"| `{a['name']}` | {a['kind']} | {a.get('num_classes') or '-'} |" for a in config["attributes"])
    pre = config.get("preprocessing")
    pre_text = ("Custom inputs: no image preprocessing is recorded." if not pre else
                f"input size {tuple(pre['input_size'])}, mean {tuple(pre['mean'])}, std {tuple(pre['std'])}, "
                f"{pre['interpolation']} resize, crop_pct {pre['crop_pct']} ({pre.get('crop_mode', 'center')} crop); "
                "`model.preprocess` applies it to PIL images.")
    if not heads_only:
        weights_text = "`model.safetensors` holds the frozen backbone and the trained heads."
    elif source == "custom":
        weights_text = ("This repo holds only the trained heads: pass the backbone they were trained on as "
                        "`backbone=` when loading.")
    else:
        weights_text = (f"This repo holds only the trained heads; the frozen backbone is rebuilt from "
                        f"`{source}:{arch}` with weights `{tag}` when loading (a download), or passed as `backbone=`.")
    description = (
        f"A DeepMinMax (Han, Wang, Long, Peng, AAAI-22) debiased encoder made with `dmm_wrap`. The backbone is "
        f"{backbone} and stays frozen. Its output at layer `{config['layer'] or '(model output)'}`, "
        f"{config['pool']}-pooled to {config['feature_dim']} features, is mapped by a trained network h_theta to "
        f"{config['out_dim']} debiased features Z~ from which the attributes below were removed: the mutual "
        "information I(B; Z~) is minimised with CLUB while Z is kept recoverable from Z~ and B."
    )
    load_args = f'"{repo_id or "REPO_ID_OR_FOLDER"}"' + (", backbone=my_backbone" if source == "custom" else "")
    text = f"""---
{data.to_yaml()}
---

# {name}

{description}

## Attributes removed

| attribute | kind | classes |
|---|---|---|
{attrs}

## Weights and preprocessing

{weights_text}

Preprocessing: {pre_text}

## Metrics

{_metrics_table(metrics)}
{_audit_section(audit)}
## Usage

```python
from dmm_wrap import DebiasedEncoder

model = DebiasedEncoder.from_pretrained({load_args})
z_tilde = model.embed(images)  # a list of PIL images or a tensor [N, C, H, W] -> debiased features on CPU
```
"""
    return _mark(str(ModelCard(text)))


def _mark(card: str) -> str:
    """`card` with the marker line that lets `is_generated_card` tell it from an edited one."""
    card = card if card.endswith("\n") else card + "\n"
    digest = hashlib.sha256(card.encode()).hexdigest()
    return card + f"<!-- dmm_wrap model card, sha256 {digest}: save_pretrained regenerates it unless edited -->\n"


def _marked_intact(text: str) -> bool:
    """Whether `text` ends with our marker line and is unchanged since it was written."""
    match = _CARD_MARK.search(text)
    return match is not None and hashlib.sha256(text[:match.start()].encode()).hexdigest() == match["sha"]


def _base_model(source: str | None, arch: str | None, tag: str | None) -> tuple[str | None, str | None]:
    """The Hub id and license of timm pretrained weights; torchvision weights are not on the Hub."""
    if source != "timm" or not tag:
        return None, None
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(f"{arch}.{tag}")
    except Exception:  # noqa: BLE001 - an unknown tag only loses the metadata
        return None, None
    if cfg is None:
        return None, None
    return cfg.hf_hub_id or None, cfg.license or None


def _metrics_table(metrics: Mapping[str, Any] | None) -> str:
    metrics = {k: v for k, v in (metrics or {}).items() if k != WEIGHTS_SHA_KEY}  # what they belong to, not a metric
    if not metrics:
        return "No metrics were recorded (pass `metrics=` to save_pretrained, or write metrics.json)."
    rows = [f"| {k} | {_fmt(v)} |" for k, v in _flatten(metrics)]
    return "| metric | value |\n|---|---|\n" + "\n".join(rows)


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _audit_section(audit: Mapping[str, Any] | None) -> str:
    """The card's "Leakage audit" section: per attribute, each feature set's MLP-probe score and verdict."""
    if not audit:
        return ""
    criteria, samples, features = audit["criteria"], audit["samples"], audit["features"]
    views = list(features)
    header = "| attribute | metric | chance | removed if MLP ≤ | " + " | ".join(f"{v}: MLP (verdict)" for v in views)
    rows = []
    for attr, first in features[views[0]].items():
        chance = "-" if first["chance"] is None else _fmt(first["chance"])
        cells = [f"`{attr}`", first["metric"].replace("_", " "), chance, _fmt(first["threshold"])]
        cells += [f"{_fmt(features[v][attr]['mlp'])} ({features[v][attr]['verdict']})" for v in views]
        rows.append("| " + " | ".join(cells) + " |")
    return f"""
## Leakage audit

Probes trained on {samples['train']} samples and scored on {samples['test']} held-out ones ({audit['split']}). An
attribute counts as removed when a freshly trained MLP probe reads it no better than chance + {criteria['margin']:g}
(balanced accuracy, chance 1/K) or R² {criteria['max_r2']:g} (continuous). Details: `audit.json`.

{header} |
|{'---|' * (4 + len(views))}
""" + "\n".join(rows) + "\n"


def load_metrics(folder: Path) -> dict[str, Any] | None:
    """The metrics.json of a saved folder, if any."""
    return read_metrics(folder / METRICS_NAME)


def load_audit(folder: Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The audit.json of a saved folder when it audits the weights beside it (`config`'s weights_sha256); None when
    there is none, or (with a warning) when it records other weights (the model was saved again since)."""
    audit = read_metrics(folder / AUDIT_NAME)
    if audit is None:
        return None
    audited = (audit.get("model") or {}).get("weights_sha256")
    if audited is not None and audited != config.get("weights_sha256"):
        logger.warning("%s audits other weights than the ones saved beside it; it is left out of the model card and "
                       "of uploads. Run the audit again on the saved model.", folder / AUDIT_NAME)
        return None
    return audit


def is_generated_card(folder: Path, config: dict[str, Any], metrics: Mapping[str, Any] | None,
                      audit: Mapping[str, Any] | None) -> bool:
    """Whether the folder's README.md is the card save_pretrained wrote (with or without `audit`), not edited: its
    marker line matches its text, or (a card written before cards had one) it equals the card of `config`."""
    path = folder / README_NAME
    if not path.is_file():
        return False
    text = path.read_text()
    if _marked_intact(text):
        return True
    unmarked = [_CARD_MARK.sub("", model_card(config, metrics))]
    if audit is not None:
        unmarked.append(_CARD_MARK.sub("", model_card(config, metrics, audit=audit)))
    return text in unmarked


def card_was_edited(folder: Path) -> bool:
    """Whether `folder` holds a README.md that is not a card dmm_wrap generated, or one edited since (save_pretrained
    keeps such a card)."""
    if not (folder / README_NAME).is_file():
        return False
    if _marked_intact((folder / README_NAME).read_text()):
        return False
    try:
        config = read_config(folder / CONFIG_NAME)
        return not is_generated_card(folder, config, load_metrics(folder), load_audit(folder, config))
    except (OSError, ValueError, KeyError, TypeError):  # no config of ours beside it: a card of someone else's
        return True


def card_with_audit(folder: Path, audit: Mapping[str, Any]) -> str | None:
    """The README.md of the saved model in `folder` rewritten to carry `audit`; None when `folder` holds no saved
    model, its card was edited by hand, or `audit` records other weights than the folder's."""
    if not (folder / CONFIG_NAME).is_file():
        return None
    try:
        config = read_config(folder / CONFIG_NAME)
    except ValueError:  # another library's config.json: no card of ours to update
        return None
    audited = (audit.get("model") or {}).get("weights_sha256")
    if audited is not None and audited != config.get("weights_sha256"):
        return None
    metrics = load_metrics(folder)
    if not is_generated_card(folder, config, metrics, load_audit(folder, config)):
        return None
    return model_card(config, metrics, audit=audit)


__all__ = ["resolve_pretrained", "push_folder_to_hub", "check_folder", "model_card", "load_metrics", "load_audit",
           "is_generated_card", "card_was_edited", "card_with_audit", "UPLOAD_FILES", "DEFAULT_COMMIT_MESSAGE"]
