"""The project's own targets for a run, and their check against its metrics (shown in report.md and by the CLI).

The evaluation (`dmm_wrap.apps.evaluate`) measures; this module says what counts as good enough. The two leakage
criteria are also the defaults of `Leakage.removed` and of the audit's verdict (`AuditConfig`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .evaluate import Metrics

TASK_GAIN = 0.03
"""Target: DeepMinMax task accuracy at least raw + TASK_GAIN (and at least LEACE's), as the paper's digits result
(0.935 -> 0.994) asks of an encoder trained without the task labels."""
MAX_R2 = 0.10
"""Target: MLP-probe R^2 of every continuous attribute on Z~ at most this."""
CHANCE_MARGIN = 0.05
"""Target: MLP-probe balanced accuracy of every categorical attribute on Z~ at most chance + this."""
TRANSFER_GAIN = 0.03
"""Target: on test rows of attribute classes training never saw, DeepMinMax task accuracy and AUROC at least
raw + TRANSFER_GAIN (and at least LEACE's)."""


class TargetRow(NamedTuple):
    """One target of the issue, checked against a measurement."""

    name: str
    """What is compared, with its direction, e.g. "dmm task accuracy >= raw + 0.03"."""
    measured: float
    target: float
    """The threshold the measurement is compared with."""
    met: bool


def check_targets(metrics: Metrics) -> list[TargetRow]:
    """Compare DeepMinMax against the issue's targets.

    Task: dmm accuracy >= raw + TASK_GAIN and >= LEACE's. Leakage by the MLP probe on Z~ (`Leakage.removed`):
    R^2 <= MAX_R2 for continuous attributes, balanced accuracy <= chance + CHANCE_MARGIN for categorical ones.
    """
    rows: list[TargetRow] = []
    dmm = metrics.methods.get("dmm")
    if dmm is None:
        return rows
    raw, leace = metrics.methods.get("raw"), metrics.methods.get("leace")
    if dmm.task_accuracy is not None:
        if raw is not None and raw.task_accuracy is not None:
            target = raw.task_accuracy + TASK_GAIN
            rows.append(TargetRow(f"dmm task accuracy >= raw + {TASK_GAIN:g}", dmm.task_accuracy, target,
                                  dmm.task_accuracy >= target))
        if leace is not None and leace.task_accuracy is not None:
            rows.append(TargetRow("dmm task accuracy >= leace", dmm.task_accuracy, leace.task_accuracy,
                                  dmm.task_accuracy >= leace.task_accuracy))
    for name, lk in dmm.leakage.items():
        what = f"R2 of {name} <= {MAX_R2:g}" if lk.metric == "r2" else \
            f"balanced accuracy of {name} <= chance + {CHANCE_MARGIN:g}"
        rows.append(TargetRow(f"dmm MLP-probe {what}", lk.mlp, lk.threshold(CHANCE_MARGIN, MAX_R2),
                              lk.removed(CHANCE_MARGIN, MAX_R2)))
    return rows + transfer_targets(metrics)


def transfer_targets(metrics: Metrics) -> list[TargetRow]:
    """On the unseen classes of `metrics.transfer`: dmm task accuracy and AUROC >= raw + TRANSFER_GAIN and >= LEACE."""
    rows: list[TargetRow] = []
    for t in metrics.transfer:
        dmm = t.methods.get("dmm", {}).get("unseen")
        if dmm is None:
            continue
        for score in ("accuracy", "auroc"):
            mine = getattr(dmm, score)
            for method, gain in (("raw", TRANSFER_GAIN), ("leace", 0.0)):
                other = t.methods.get(method, {}).get("unseen")
                theirs = getattr(other, score) if other is not None else None
                if mine is None or theirs is None:
                    continue
                name = f"dmm task {score} on unseen {t.attribute} >= {method}" + (f" + {gain:g}" if gain else "")
                rows.append(TargetRow(name, mine, theirs + gain, mine >= theirs + gain))
    return rows


__all__ = ["TASK_GAIN", "MAX_R2", "CHANCE_MARGIN", "TRANSFER_GAIN", "TargetRow", "check_targets", "transfer_targets"]
