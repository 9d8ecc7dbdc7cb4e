"""The model card (README.md) of a saved model: YAML metadata for the Hub, description, metrics, leakage audit, usage;
and how to tell a card dmm_wrap generated from one edited by hand (a marker line with its sha256)."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .serialization import AUDIT_NAME, CONFIG_NAME, METRICS_NAME, README_NAME, WEIGHTS_SHA_KEY, read_config, read_metrics

logger = logging.getLogger(__name__)

_CARD_MARK = re.compile(r"<!-- dmm_wrap model card, sha256 (?P<sha>[0-9a-f]{64}): [^\n]*-->\n?\Z")
"""The last line of a card dmm_wrap generated: the sha256 of the text above it, so that an edit is recognised."""


def model_card(config: dict[str, Any], metrics: Mapping[str, Any] | None = None, repo_id: str | None = None,
               audit: Mapping[str, Any] | None = None) -> str:
    """The README.md of a saved model: YAML metadata for the Hub, a description, the metrics, the leakage audit (when
    one is given) and a usage snippet.

    Args:
        config: the model's config.json content (`DebiasedEncoder.config_dict()`).
        metrics: {name: value}, nested mappings allowed; rendered as a table.
        repo_id: used in the usage snippet; None writes a placeholder.
        audit: the content of an audit.json (`dmm_wrap.apps.leakage.AuditReport.to_dict()`); None leaves the section out.
    """
    from huggingface_hub import ModelCard

    spec = config["backbone"]
    source, arch = spec.get("source"), spec.get("name")
    name = repo_id.split("/")[-1] if repo_id else f"DeepMinMax {arch}"
    attrs = "\n".join(f"| `{a['name']}` | {a['kind']} | {a.get('num_classes') or '-'} |" for a in config["attributes"])
    load_args = f'"{repo_id or "REPO_ID_OR_FOLDER"}"' + (", backbone=my_backbone" if source == "custom" else "")
    text = f"""---
{_card_data(spec).to_yaml()}
---

# {name}

{_description(config)}

## Attributes removed

| attribute | kind | classes |
|---|---|---|
{attrs}

## Weights and preprocessing

{_weights_text(config)}

Preprocessing: {_preprocessing_text(config.get("preprocessing"))}

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


def _card_data(spec: Mapping[str, Any]) -> Any:
    """The card's YAML metadata (`huggingface_hub.ModelCardData`): library, tags, base model and license."""
    from huggingface_hub import ModelCardData

    source, arch, tag = spec.get("source"), spec.get("name"), spec.get("pretrained_tag")
    base_model, license_ = _base_model(source, arch, tag)
    tags = ["dmm_wrap", "debiasing", "deepminmax", "fairness", "feature-extraction"]
    if source in ("timm", "torchvision"):
        tags += [source, "image-feature-extraction"]
    return ModelCardData(library_name="dmm_wrap", tags=tags, base_model=base_model, license=license_,
                         pipeline_tag="image-feature-extraction" if source in ("timm", "torchvision") else None)


def _description(config: Mapping[str, Any]) -> str:
    """The card's first paragraph: the method, the backbone, the hooked layer and the feature widths."""
    spec = config["backbone"]
    source, arch, tag = spec.get("source"), spec.get("name"), spec.get("pretrained_tag")
    backbone = f"{source}:{arch}" + (f" with pretrained weights `{tag}`" if tag else " (weights in this repo)")
    if source == "custom":
        backbone = f"a custom `{arch}` module"
    features = (f"The backbone is {backbone} and stays frozen. Its output at layer "
                f"`{config['layer'] or '(model output)'}`, {config['pool']}-pooled to {config['feature_dim']} "
                f"features, is mapped")
    head = config.get("head", {})
    if head.get("align_head_pieces") is not None:
        groups = head.get("align_head_groups")
        return (f"A debiased encoder made with `dmm_wrap`'s alignment head. {features} by a fitted piecewise "
                f"alignment to {config['out_dim']} debiased features Z~: each "
                + ("joint group of the attributes' classes and bins" if groups else "attribute group")
                + " is predicted from Z, and its pieces are moved onto the pooled pieces by their Gaussian maps, so "
                "Z~ needs no attribute at inference.")
    return (
        f"A DeepMinMax (Han, Wang, Long, Peng, AAAI-22) debiased encoder made with `dmm_wrap`. {features} by a "
        f"trained network h_theta to {config['out_dim']} debiased features Z~ from which the attributes below were "
        "removed: the mutual information I(B; Z~) is minimised with CLUB while Z is kept recoverable from Z~ and B."
    )


def _weights_text(config: Mapping[str, Any]) -> str:
    """What model.safetensors holds, and where the backbone comes from when it holds only the heads."""
    spec = config["backbone"]
    source, arch, tag = spec.get("source"), spec.get("name"), spec.get("pretrained_tag")
    if config.get("weights") != "heads_only":
        return "`model.safetensors` holds the frozen backbone and the trained heads."
    if source == "custom":
        return ("This repo holds only the trained heads: pass the backbone they were trained on as `backbone=` when "
                "loading.")
    return (f"This repo holds only the trained heads; the frozen backbone is rebuilt from `{source}:{arch}` with "
            f"weights `{tag}` when loading (a download), or passed as `backbone=`.")


def _preprocessing_text(pre: Mapping[str, Any] | None) -> str:
    """The recorded preprocessing, in words."""
    if not pre:
        return "Custom inputs: no image preprocessing is recorded."
    return (f"input size {tuple(pre['input_size'])}, mean {tuple(pre['mean'])}, std {tuple(pre['std'])}, "
            f"{pre['interpolation']} resize, crop_pct {pre['crop_pct']} ({pre.get('crop_mode', 'center')} crop); "
            "`model.preprocess` applies it to PIL images.")


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


__all__ = ["model_card", "load_metrics", "load_audit", "is_generated_card", "card_was_edited", "card_with_audit"]
