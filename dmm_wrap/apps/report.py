"""The run report: a metrics table, the targets, a t-SNE figure, the training curves and the trade-off of a sweep.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so no global backend is
switched and nothing needs a display.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import Attribute
from ..io.serialization import write_text_atomically
from ..train.loop import FitHistory
from .evaluate import FeatureSet, Metrics
from .targets import CHANCE_MARGIN, MAX_R2, TargetRow
from .transfer import GROUPS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHOD_TITLES = {"raw": "raw Z", "leace": "LEACE", "dmm": "debiased Z~"}
"""How each method is named in tables and figures; "dmm" is the model's output, whether h_theta was trained by
DeepMinMax or is the alignment head (`method: alignment_head`)."""


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table whose columns are padded to their widest cell, so that it also reads as plain text."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def format_table(metrics: Metrics) -> str:
    """A Markdown table: one row per method, task accuracy then linear / MLP leakage per attribute, chance first.

    Example:
        >>> print(format_table(Metrics.from_dict(json.load(open("runs/x/metrics.json")))))
    """
    names = list(metrics.methods)
    first = metrics.methods[names[0]]
    header = ["method", "task acc"]
    for attr, lk in first.leakage.items():
        unit = "R²" if lk.metric == "r2" else "bal. acc"
        header += [f"{attr} {unit} linear", f"{attr} {unit} MLP"]
    rows = [["chance", "—"] + [cell for lk in first.leakage.values() for cell in (_fmt(lk.chance),) * 2]]
    for name in names:
        m = metrics.methods[name]
        row = [METHOD_TITLES.get(name, name), _fmt(m.task_accuracy)]
        for lk in m.leakage.values():
            row += [_fmt(lk.linear), _fmt(lk.mlp)]
        rows.append(row)
    return markdown_table(header, rows)


def format_transfer(metrics: Metrics) -> str:
    """Markdown: for each attribute with classes training never saw, task accuracy and AUROC per method on the test
    rows of seen and of unseen classes (empty when there is none)."""
    parts = []
    for t in metrics.transfer:
        first = next(iter(t.methods.values()))
        counts = ", ".join(f"{g} {s.samples}" if s is not None else f"{g} 0" for g, s in first.items())
        parts.append(f"Transfer to {t.attribute} {list(t.unseen)}, never seen in training (test rows: {counts}):")
        parts.append("")
        rows = [[METHOD_TITLES.get(m, m)] + [cell for g in GROUPS for cell in (
            (_fmt(groups[g].accuracy), _fmt(groups[g].auroc)) if groups.get(g) is not None else ("—", "—"))]
                for m, groups in t.methods.items()]
        parts.append(markdown_table(["method", "seen task acc", "seen AUROC", "unseen task acc", "unseen AUROC"],
                                    rows))
        parts.append("")
    return "\n".join(parts).rstrip("\n")


def format_targets(rows: Sequence[TargetRow]) -> str:
    """One Markdown bullet per target: MET / NOT MET, the measurement and the threshold."""
    if not rows:
        return "- (no target applies: DeepMinMax was not evaluated)"
    return "\n".join(f"- **{'MET' if r.met else 'NOT MET'}**: {r.name} — measured {r.measured:.3f}, "
                     f"target {r.target:.3f}" for r in rows)


def render_report(metrics: Metrics, targets: Sequence[TargetRow], figures: Sequence[str] = (),
                  title: str = "dmm_wrap run", notes: Sequence[str] = ()) -> str:
    """The text of report.md: the table, the targets, the figures (paths relative to the report) and notes."""
    met = sum(r.met for r in targets)
    parts = [
        f"# {title}",
        "",
        "Task accuracy: logistic regression on standardised features, trained on the train split, scored on the test "
        "split. Leakage: probes trained on "
        + ("the probe split's features (samples nothing was fitted on)" if metrics.leakage_probes == "probe" else
           "train features (in-sample: the samples h_theta was fitted on, which can understate the leakage)")
        + " and scored on held-out test features (balanced accuracy for categorical attributes, chance = 1/K for K "
        "classes; R² for continuous ones, 0 = no information).",
        "",
        format_table(metrics),
        "",
        *([format_transfer(metrics), ""] if metrics.transfer else []),
        f"## Targets ({met}/{len(targets)} met)",
        "",
        format_targets(targets),
        "",
        f"Whole run: {metrics.wall_seconds:.1f} s.",
    ]
    if notes:
        parts += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    if figures:
        parts += ["", "## Figures", ""]
        parts += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(parts) + "\n"


def write_report(path: str | os.PathLike, metrics: Metrics, targets: Sequence[TargetRow],
                 figures: Sequence[str] = (), title: str = "dmm_wrap run", notes: Sequence[str] = ()) -> Path:
    """Write report.md (see `render_report`), atomically."""
    return write_text_atomically(path, render_report(metrics, targets, figures, title, notes))


# --------------------------------------------------------------------------- figures
def _figure(rows: int, cols: int, size: tuple[float, float]) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("Figures need matplotlib: pip install 'dmm-wrap[report]'.") from err
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def embed_tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE embedding (PCA init) of standardised features."""
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(features)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed).fit_transform(x)


def plot_tsne(test: FeatureSet, attributes: Sequence[Attribute], path: str | os.PathLike, max_points: int = 1000,
              seed: int = 0, label_name: str = "label") -> Path:
    """t-SNE of raw Z (top row) and DeepMinMax Z~ (bottom row) coloured by each attribute and by the task label.

    This is the paper's Figure 1: after debiasing, the colours of an attribute should be mixed while the task
    label still forms clusters.

    Example:
        >>> plot_tsne(extract_features(encoder, test_loader), encoder.attributes, "runs/x/tsne.png")
    """
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    n = len(test.raw)
    idx = np.random.default_rng(seed).permutation(n)[: min(n, max_points)]
    idx.sort()
    # (title, values, number of classes or None for a continuous colour scale)
    colourings = [(a.name, test.attrs[idx, k], a.num_classes) for k, a in enumerate(attributes)]
    if (test.labels[idx] >= 0).any():
        colourings.append((label_name, test.labels[idx], int(test.labels.max()) + 1))
    views = [("raw", test.raw[idx]), ("dmm", test.debiased[idx])]
    fig = _figure(len(views), len(colourings), (3.4, 3.0))
    axes = fig.subplots(len(views), len(colourings), squeeze=False)
    for r, (method, feats) in enumerate(views):
        xy = embed_tsne(feats, seed)
        for c, (name, values, classes) in enumerate(colourings):
            ax = axes[r][c]
            if classes is not None:  # one distinct colour per class, one tick per class
                base = colormaps["tab10" if classes <= 10 else "tab20"]
                cmap = ListedColormap(base.colors[:classes]) if classes <= base.N else base.resampled(classes)
                sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=4, cmap=cmap, vmin=-0.5, vmax=classes - 0.5)
                fig.colorbar(sc, ax=ax, shrink=0.8, ticks=range(classes) if classes <= 20 else None)
            else:
                sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=4, cmap="viridis")
                fig.colorbar(sc, ax=ax, shrink=0.8)
            ax.set_title(f"{METHOD_TITLES[method]} — {name}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"t-SNE of {len(idx)} test samples", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < window:
        return v
    kernel = np.ones(window) / window
    return np.convolve(np.pad(v, (window - 1, 0), mode="edge"), kernel, mode="valid")


def plot_training_curves(history: FitHistory, path: str | os.PathLike) -> Path:
    """Loss terms of `fit` against the step: total loss, CLUB per attribute (and their sum), retain NLL, q's NLL.

    Raw values are drawn faint, a moving average on top.
    """
    window = max(1, len(history.step) // 50)
    panels = [("loss = lam L_d + (1 - lam) L_r", {"loss": history.loss}),
              ("debias L_d: CLUB of I(B; Z~) (nats)", {"sum": history.debias, **history.club}),
              ("retain L_r: -log m(Z | Z~, B)", {"retain": history.retain}),
              ("q NLL: fit of CLUB's q(B | Z~)", {"q_nll": history.q_nll})]
    fig = _figure(2, 2, (4.6, 3.2))
    axes = fig.subplots(2, 2, squeeze=False).ravel()
    steps = np.asarray(history.step)
    for ax, (title, series) in zip(axes, panels):
        for i, (name, values) in enumerate(series.items()):
            if not values:
                continue
            colour = f"C{i}"
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(values, window), color=colour, linewidth=1.5, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        if len(series) > 1:
            ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_transfer(metrics: Metrics, path: str | os.PathLike) -> Path:
    """Bars of task accuracy and AUROC per method on the seen and the unseen classes, one row of panels per
    attribute of `metrics.transfer`.

    Example:
        >>> plot_transfer(metrics, "runs/x/transfer.png")
    """
    if not metrics.transfer:
        raise ValueError("plot_transfer needs metrics with a transfer evaluation (test classes unseen in training).")
    fig = _figure(len(metrics.transfer), 2, (4.4, 3.2))
    axes = fig.subplots(len(metrics.transfer), 2, squeeze=False)
    for row, t in zip(axes, metrics.transfer):
        methods = list(t.methods)
        width = 0.8 / len(methods)
        for ax, score in zip(row, ("accuracy", "auroc")):
            for k, method in enumerate(methods):
                values = [getattr(t.methods[method][g], score) if t.methods[method].get(g) is not None else None
                          for g in GROUPS]
                xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(GROUPS))]
                ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
                       width, label=METHOD_TITLES.get(method, method), color=f"C{k}")
            ax.set_xticks(range(len(GROUPS)), [f"{g} {t.attribute}" for g in GROUPS])
            ax.set_ylabel("task " + ("accuracy" if score == "accuracy" else "AUROC (one-vs-rest)"))
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{t.attribute} {list(t.unseen)} unseen in training", fontsize=9)
        row[0].legend(fontsize=7, loc="lower left")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_tradeoff(points: Sequence[tuple[str, Metrics]], path: str | os.PathLike, title: str = "") -> Path:
    """Task accuracy (x) against the MLP-probe leakage of each attribute (y), one panel per attribute.

    Each (label, metrics) of `points` is one DeepMinMax run, drawn as a labelled point and joined to the next one in
    order; the raw features and LEACE of the same runs are drawn as reference points (once when the runs agree on
    them, as runs on the same data do). A dotted line marks chance (R² 0 for a continuous attribute), a dashed one
    the level at or below which the attribute counts as removed.

    Example:
        >>> plot_tradeoff([("lam=0.2", m02), ("lam=0.8", m08)], "runs/sweep/sweep.png")
    """
    if not points:
        raise ValueError("plot_tradeoff needs at least one (label, metrics) point.")
    for label, m in points:
        if "dmm" not in m.methods or m.methods["dmm"].task_accuracy is None:
            raise ValueError(f"Run {label!r} has no DeepMinMax task accuracy: the trade-off figure needs task labels "
                             "in the evaluation data (e.g. data.label_column for image_csv).")
    first = points[0][1].methods["dmm"]
    attrs = list(first.leakage)
    fig = _figure(1, len(attrs), (4.2, 3.6))
    axes = fig.subplots(1, len(attrs), squeeze=False)[0]
    for ax, attr in zip(axes, attrs):
        xs = [m.methods["dmm"].task_accuracy for _, m in points]
        ys = [m.methods["dmm"].leakage[attr].mlp for _, m in points]
        ax.plot(xs, ys, "-o", color="C0", markersize=5, label=METHOD_TITLES["dmm"], zorder=3)
        for (label, _), x, y in zip(points, xs, ys):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        for method, marker, colour in (("raw", "s", "0.25"), ("leace", "^", "C1")):
            refs = sorted({(m.methods[method].task_accuracy, m.methods[method].leakage[attr].mlp)
                           for _, m in points if method in m.methods and m.methods[method].task_accuracy is not None})
            if refs:
                rx, ry = zip(*refs)
                ax.scatter(rx, ry, marker=marker, color=colour, s=45, label=METHOD_TITLES[method], zorder=4)
        lk = first.leakage[attr]
        ax.axhline(lk.chance if lk.chance is not None else 0.0, color="0.5", linestyle=":", linewidth=1,
                   label="chance (1/K, or R² 0)")
        ax.axhline(lk.threshold(CHANCE_MARGIN, MAX_R2), color="C3", linestyle="--", linewidth=1,
                   label="removed at or below")
        ax.set_xlabel("task accuracy")
        ax.set_ylabel("MLP-probe " + ("R²" if lk.metric == "r2" else "balanced accuracy"))
        ax.set_title(attr, fontsize=10)
    axes[0].legend(fontsize=7)  # the same entries in every panel
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


__all__ = ["format_table", "format_transfer", "markdown_table", "format_targets", "render_report", "write_report",
           "embed_tsne", "plot_tsne", "plot_training_curves", "plot_transfer", "plot_tradeoff", "METHOD_TITLES"]
