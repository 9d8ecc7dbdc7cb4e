"""Typed configuration: what is saved with the weights (Attribute, HeadConfig), and what only drives a training run
(FitConfig) or its evaluation (EvalConfig). Their checks, and `validate`, come from `dmm_wrap.validation`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .validation import (ConfigError, MissingFileError, check_choice, check_fields, check_value, got, known_keys,
                         matches, type_name, validate)

AttributeKind = Literal["categorical", "continuous"]
Pooling = Literal["avg", "max", "cls", "flatten"]
NllReduction = Literal["mean", "sum"]
AmpDtype = Literal["bfloat16", "float16"]
AlignMaps = Literal["full", "diagonal", "shift"]
AlignShrinkage = float | Literal["oas"]
"""A covariance shrinkage: a fixed fraction in [0, 1], or "oas", the Oracle Approximating Shrinkage fraction of each
estimate's own row count (Chen et al., 2010; `dmm_wrap.core.alignment.oas_shrinkage`)."""


@dataclass(frozen=True)
class Attribute:
    """A sensitive attribute B to remove from the features.

    Example:
        >>> Attribute("hospital", "categorical", num_classes=5)
        >>> Attribute("rotation", "continuous")
    """

    name: str
    """Column name; attribute tensors are given in the declared order."""

    kind: AttributeKind
    """"categorical" (class ids 0..num_classes-1) or "continuous" (real values)."""

    num_classes: int | None = None
    """Number of classes; required for categorical attributes, None for continuous ones."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.name:
            raise ValueError(f"Attribute.name must be a non-empty string, got {self.name!r}.")
        check_choice("Attribute", "kind", self.kind, get_args(AttributeKind))
        if self.kind == "categorical":
            if self.num_classes is None or self.num_classes < 2:
                raise ValueError(
                    f"Attribute {self.name!r} is categorical and needs num_classes >= 2 "
                    f"(an int), got {self.num_classes!r}."
                )
        elif self.num_classes is not None:
            raise ValueError(
                f"Attribute {self.name!r} is continuous; num_classes must be None, got {self.num_classes!r}."
            )

    @property
    def width(self) -> int:
        """Width of this attribute's encoding as an input of the retaining density (one-hot or scalar)."""
        return self.num_classes if self.kind == "categorical" else 1

    def to_dict(self) -> dict[str, Any]:
        """The declaration as a plain mapping, as config.json stores it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attribute:
        """Read back `to_dict()`; unknown keys are dropped with a warning."""
        return cls(**known_keys(cls, d, "attribute"))


@dataclass
class HeadConfig:
    """Architecture of the trained heads; saved with the weights."""

    h_layers: int = 3
    """Linear layers in the debiasing map h_theta (paper: 3)."""

    h_hidden: int | None = None
    """Hidden width of h_theta; None means the feature width (paper)."""

    out_dim: int | None = None
    """Width of the debiased features; None means the feature width (paper)."""

    m_layers: int = 2
    """Linear layers in the retaining density m_phi(Z | Z~, B) (paper: 2)."""

    m_hidden: int | None = None
    """Hidden width of m_phi; None means the feature width (paper)."""

    q_hidden: int | None = None
    """Hidden width of each CLUB variational network q(B | Z~); None means the feature width."""

    logvar_min: float = -6.0
    """Lower bound of every predicted log-variance: an unbounded one lets CLUB and the NLL diverge."""

    logvar_max: float = 4.0
    """Upper bound of every predicted log-variance."""

    q_floor: float = 0.01
    """Weight of the uniform distribution mixed into each categorical q: bounds CLUB by log(K / q_floor) when the
    classes are separable (0 = a plain softmax)."""

    residual: bool = False
    """h_theta is the identity plus an MLP whose last layer starts at zero, so Z~ starts as the standardised Z and
    moves only as far as the objective asks (needs out_dim None). False (default) is the paper's plain MLP."""

    standardize: bool = True
    """Standardise Z (and continuous B) with statistics from a streamed pre-pass, so that one learning
    rate suits any backbone's feature scale. Off reproduces the paper's raw-feature setting."""

    align_head_pieces: list[int] | None = None
    """Set by `DebiasedEncoder.fit_alignment_head`, not by hand: h_theta is then a fitted alignment applied with each
    attribute predicted from Z (`dmm_wrap.core.alignment.PredictedAlignment`) with these pieces per attribute, and
    not the MLP. None (default): the MLP."""

    align_head_maps: AlignMaps | None = None
    """The alignment head's per-piece maps (set with `align_head_pieces`)."""

    align_head_groups: list[int] | None = None
    """Set with `align_head_pieces` when the head aligns joint groups (`fit_alignment_head(joint=True)`, and
    whenever an attribute is continuous): the group count of each stage (one stage: every combination of the
    attributes' classes and bins). None: one stage per attribute, its classes."""

    def __post_init__(self) -> None:
        check_fields(self)
        for key in ("h_layers", "m_layers"):
            v = getattr(self, key)
            if v < 1:
                raise ValueError(f"HeadConfig.{key} must be an int >= 1, got {v!r}.")
        for key in ("h_hidden", "out_dim", "m_hidden", "q_hidden"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"HeadConfig.{key} must be None or an int >= 1, got {v!r}.")
        if self.residual and self.out_dim is not None:
            raise ValueError(f"HeadConfig.residual=True keeps the feature width, so out_dim must be None, got "
                             f"{self.out_dim!r}. Set residual=False to change the width of Z~.")
        if not 0.0 <= self.q_floor < 1.0:
            raise ValueError(f"HeadConfig.q_floor must lie in [0, 1), got {self.q_floor!r}.")
        if not self.logvar_min < self.logvar_max:
            raise ValueError(
                f"HeadConfig.logvar_min ({self.logvar_min}) must be below logvar_max ({self.logvar_max})."
            )
        if self.align_head_pieces is not None:
            if not self.align_head_pieces or min(self.align_head_pieces) < 1:
                raise ValueError(f"HeadConfig.align_head_pieces must list one int >= 1 per stage (one per attribute, "
                                 f"or one for joint groups), got {self.align_head_pieces!r}.")
            groups = self.align_head_groups
            if groups is not None and (len(groups) != len(self.align_head_pieces) or min(groups) < 1):
                raise ValueError(f"HeadConfig.align_head_groups must list one int >= 1 per stage of "
                                 f"align_head_pieces ({self.align_head_pieces!r}), got {groups!r}.")
            if self.out_dim is not None:
                raise ValueError(f"An alignment head keeps the feature width, so out_dim must be None (build the "
                                 f"encoder without it), got {self.out_dim!r}.")

    @classmethod
    def aligned(cls, **overrides: Any) -> HeadConfig:
        """The heads `FitConfig.aligned()` was measured with: a residual h_theta (it starts as the identity, so the
        alignment's least-movement matching holds) with hidden width 256."""
        base: dict[str, Any] = dict(residual=True, h_hidden=256)
        base.update(overrides)
        return cls(**base)


def check_shrinkage(value: object, name: str) -> None:
    """Raise unless `value` is a covariance shrinkage: a number in [0, 1] or "oas"."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (value == "oas" or (number and 0 <= value <= 1)):  # type: ignore[operator]
        raise ValueError(f'{name} must be a number in [0, 1] or "oas", got {value!r}.')


@dataclass
class FitConfig:
    """Options of one training run (`DebiasedEncoder.fit`); not saved with the weights."""

    epochs: int = 200
    """Passes over the loader (paper: 200). `max_steps` stops earlier."""

    max_steps: int | None = None
    """Stop after this many optimisation steps of h_theta, whatever `epochs` says."""

    lr: float = 1e-3
    """Adam learning rate of h_theta. The paper uses 0.005 for all networks; h_theta is slowed here so that CLUB's q,
    which must track the moving Z~, stays ahead of it (two time-scales, as in adversarial training)."""

    estimator_lr: float | None = 5e-3
    """Adam learning rate of q and m_phi (paper: 0.005); None means `lr`."""

    lam: float = 0.5
    """Weight lambda of the debiasing term: loss = lam * L_d + (1 - lam) * L_r (paper: 0.5)."""

    match_weight: float = 0.0
    """Weight of the experimental group-matching term: the sliced Wasserstein distance between each attribute
    group's Z~ (a class, or a quantile bin of a continuous attribute) and the whole batch's Z~
    (`dmm_wrap.core.matching`). It has no network that h_theta could fool, and it is zero only when every group's Z~
    is distributed alike. 0 (default) is the paper's objective: on the leakage suite the term did not lower a fresh
    probe's leakage enough to be the default (README, "What is known not to work yet")."""

    match_projections: int | None = None
    """Random unit directions per step of the matching term (fresh every step); None = 4 per dimension of Z~, at
    least 64 and at most 1024."""

    match_bins: int = 4
    """Quantile bins of each continuous attribute within a batch, the groups the matching term aligns."""

    iso_weight: float = 0.0
    """Weight of the within-group isometry term (`dmm_wrap.core.isometry`): the mean squared difference between the
    distances of Z~ and of standardised Z over the pairs of a batch that share their attributes. It keeps each group's
    inside as it was, so that the debiasing terms move groups rather than fold them; use it with `match_weight`
    (measured: README, "The label-free encoder"). 0 turns it off (the paper's objective). Data-parallel runs pair
    the samples of each process's batch."""

    iso_bandwidth: float = 0.2
    """Width of the isometry term's Gaussian kernel on each continuous attribute's difference, in standard
    deviations of the attribute: pairs further apart count less."""

    align_weight: float = 0.0
    """Weight of the piecewise-alignment term: the mean squared distance of Z~ to a target that moves each
    attribute group's features onto the pooled ones piece by piece (`dmm_wrap.core.alignment`, fitted on the statistics
    pre-pass's features; it needs B, h_theta learns to do without). It fixes which content of one group corresponds
    to which of another by least movement, which no dependence penalty can. 0 turns it off (the paper's objective)."""

    align_clusters: int | None = None
    """Pieces per attribute group of the alignment; None = `dmm_wrap.core.pieces.choose_pieces` (2 to 12)."""

    align_bins: int = 8
    """Quantile bins of a continuous attribute for the alignment, matched in order (neighbour to neighbour)."""

    align_maps: AlignMaps | None = None
    """How each piece is mapped onto the pooled piece: "full" (Gaussian optimal transport of its mean and
    covariance, groups x pieces x D^2 floats), "diagonal" (per-coordinate scale) or "shift" (mean only); None = full
    up to 256 features, diagonal beyond."""

    align_shrinkage: AlignShrinkage = 0.1
    """How each piece's covariance is shrunk towards its mean variance before its map is fitted: a fixed fraction in
    [0, 1], or "oas", the Oracle Approximating Shrinkage fraction of the piece's own sample size (near 0 for pieces
    of many rows, more for few rows in many dimensions; `dmm_wrap.core.alignment.oas_shrinkage`)."""

    align_every: int = 400
    """Steps between rounds of the alignment target: each round copies h_theta and aligns its output again, so what
    the distillation left of the attribute is removed in the next round (`dmm_wrap.core.alignment.AlignmentTarget`)."""

    align_samples: int = 8192
    """At most this many pre-pass samples (over all processes) fit the alignment; they come from the statistics
    batches already held, so no extra pass is made, and they are kept (and checkpointed) for the later rounds."""

    select_every: int = 400
    """With `fit(..., val_loader=)`: steps between the checks of h_theta by a fresh probe on the validation sample
    (and one after the last step); the run ends with the h_theta that leaked least (`dmm_wrap.train.selection`)."""

    select_samples: int = 2048
    """Validation samples (over all processes) read once at the start for the selection probe: half train it, half
    score it. Kept (and checkpointed) as select_samples x (feature width + attributes) floats."""

    ema_decay: float | None = None
    """Decay of an exponential moving average of h_theta's weights, updated after every step of h_theta; the run
    ends with the average, and model selection scores it (`dmm_wrap.train.averaging`). The min-max game does not
    settle, and the average smooths its swings out: on the leakage suite's digits problem, 0.995 lowered the site a
    fresh probe reads (README). None (default) keeps the last step's weights. Costs one copy of h_theta."""

    estimator_steps: int = 3
    """Updates of q and m_phi per update of h_theta (paper: 1). More keep CLUB's q fitted, which its bound needs:
    an under-fitted q makes the estimate fall below the true MI, even below zero."""

    warmup_steps: int = 0
    """Steps at the start during which only q and m_phi are trained, so CLUB starts from a fitted q."""

    grad_clip: float | None = 5.0
    """Clip the gradient norm of h_theta to this value; None disables clipping."""

    nll_reduction: NllReduction = "mean"
    """"mean" averages m_phi's negative log-likelihood over feature dimensions so that L_r and L_d are of
    comparable scale for any width; "sum" is the full joint NLL of the paper's formula."""

    stats_batches: int | None = 32
    """Batches of the streamed pre-pass that estimates the standardisation statistics: the first ones of epoch 0,
    whose features are kept (stats_batches x batch size x feature_dim floats on the device) and trained on, so no
    batch runs through the backbone twice. None = one whole epoch, read in a pass of its own and not kept (epoch 0
    then runs the backbone twice)."""

    device: str | None = None
    """Device for the backbone and heads ("cpu", "cuda", "cuda:1"); None keeps the model's device."""

    amp_dtype: AmpDtype | None = None
    """Autocast dtype for the frozen backbone's forward ("bfloat16", "float16"); heads stay in float32."""

    progress: bool = True
    """Show a tqdm progress bar with the live loss terms."""

    log_every: int = 1
    """Record the loss terms in the history every this many steps."""

    checkpoint_dir: str | None = None
    """Folder for training checkpoints (written by rank 0; shared by all nodes in multi-node runs); None disables
    checkpointing. The CLI uses OUTPUT_DIR/checkpoints."""

    checkpoint_every: int = 500
    """Write a checkpoint every this many steps (and at the end, and on SIGINT / SIGTERM): a killed run loses at
    most this many steps."""

    keep_checkpoints: int = 2
    """Checkpoints kept on disk (newest first); more than one lets a damaged newest file fall back to the previous."""

    resume: bool = False
    """Continue from the newest intact checkpoint in `checkpoint_dir` (from scratch, with a warning, if none)."""

    overwrite_checkpoints: bool = False
    """Start a new run in a `checkpoint_dir` that holds an earlier run's checkpoints, removing them when this run
    writes its first one. Without it (or `resume`) such a run is refused, so that no run's checkpoints are lost."""

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint_dir, os.PathLike):
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)
        check_fields(self)
        for key in ("epochs", "estimator_steps", "log_every", "checkpoint_every", "keep_checkpoints", "align_every",
                    "select_every"):
            v = getattr(self, key)
            if v < 1:
                raise ValueError(f"FitConfig.{key} must be an int >= 1, got {v!r}.")
        for key in ("match_weight", "align_weight", "iso_weight"):
            v = getattr(self, key)
            if not v >= 0:
                raise ValueError(f"FitConfig.{key} must be a number >= 0, got {v!r}.")
        if not self.iso_bandwidth > 0:
            raise ValueError(f"FitConfig.iso_bandwidth must be a number > 0, got {self.iso_bandwidth!r}.")
        for key in ("match_bins", "align_bins"):
            v = getattr(self, key)
            if v < 2:
                raise ValueError(f"FitConfig.{key} must be an int >= 2, got {v!r}.")
        for key in ("align_samples", "select_samples"):
            if getattr(self, key) < 16:
                raise ValueError(f"FitConfig.{key} must be an int >= 16, got {getattr(self, key)!r}.")
        check_shrinkage(self.align_shrinkage, "FitConfig.align_shrinkage")
        if self.align_maps is not None and self.align_maps not in get_args(AlignMaps):
            raise ValueError(f"FitConfig.align_maps must be one of {get_args(AlignMaps)} or None, got "
                             f"{self.align_maps!r}.")
        for key in ("max_steps", "stats_batches", "match_projections", "align_clusters"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"FitConfig.{key} must be None or an int >= 1, got {v!r}.")
        if self.checkpoint_dir is not None and not self.checkpoint_dir:
            raise ValueError(f"FitConfig.checkpoint_dir must be None or a folder path, got {self.checkpoint_dir!r}.")
        if self.resume and self.overwrite_checkpoints:
            raise ConfigError("FitConfig.resume and FitConfig.overwrite_checkpoints are both True: resume continues "
                              "the run in checkpoint_dir, overwrite_checkpoints replaces it. Set only one of them.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"FitConfig.ema_decay must be None or lie in (0, 1), e.g. 0.995, got {self.ema_decay!r}.")
        if self.warmup_steps < 0:
            raise ValueError(f"FitConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}.")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"FitConfig.lam must lie in [0, 1], got {self.lam!r}.")
        if not self.lr > 0 or (self.estimator_lr is not None and not self.estimator_lr > 0):
            raise ValueError(f"FitConfig learning rates must be > 0, got lr={self.lr}, "
                             f"estimator_lr={self.estimator_lr}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"FitConfig.grad_clip must be None or > 0, got {self.grad_clip!r}.")
        check_choice("FitConfig", "nll_reduction", self.nll_reduction, get_args(NllReduction))
        if self.amp_dtype is not None:
            check_choice("FitConfig", "amp_dtype", self.amp_dtype, get_args(AmpDtype))

    @classmethod
    def paper(cls, **overrides: Any) -> FitConfig:
        """The paper's objective and setting: lambda 0.5, lr 0.005, 200 epochs, no warm-up, one q step, summed NLL,
        no matching term."""
        base = dict(epochs=200, lr=5e-3, estimator_lr=None, lam=0.5, estimator_steps=1, warmup_steps=0, grad_clip=None,
                    nll_reduction="sum", match_weight=0.0, align_weight=0.0, iso_weight=0.0)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def aligned(cls, **overrides: Any) -> FitConfig:
        """DeepMinMax with the piecewise-alignment term, as measured on the leakage suite (benchmarks/README.md):
        align_weight 100, a new round every 200 steps, lam 1 (CLUB's bound and the alignment; the retaining term
        pulled Z~ back towards Z and undid the alignment), lr 0.003. Use with `HeadConfig.aligned()`. The distillation
        needs steps: about 3000 reached the suite's figures. With `fit(..., val_loader=)`, h_theta is checked by a
        fresh probe at the end of every round and the least leaking one is kept."""
        base: dict[str, Any] = dict(align_weight=100.0, align_every=200, lam=1.0, lr=3e-3, select_every=200)
        base.update(overrides)
        return cls(**base)


SMOKE_STEPS = 100
"""A run with fit.max_steps below this is a smoke run, evaluated (and, with a validation split, selected) on at most
`EvalConfig.smoke_samples` samples."""


def is_smoke_run(max_steps: int | None) -> bool:
    """Whether a run trained with fit.max_steps = `max_steps` is a smoke run (below SMOKE_STEPS)."""
    return max_steps is not None and max_steps < SMOKE_STEPS


@dataclass
class EvalConfig:
    """Settings of the evaluation probes; not saved with the weights."""

    mlp_hidden: tuple[int, ...] = (128, 128)
    """Hidden layer sizes of the MLP leakage probes."""

    mlp_max_iter: int = 200
    """Maximum epochs of each MLP probe; early stopping on a 10% validation split usually ends it sooner."""

    linear_max_iter: int = 1000
    """Maximum iterations of the logistic regressions (task classifier and categorical linear probes)."""

    ridge_alpha: float = 1.0
    """L2 penalty of the Ridge linear probe of continuous attributes (on standardised features)."""

    seed: int = 0
    """random_state of every probe and of the t-SNE subsample."""

    leace: bool = True
    """Also evaluate LEACE-erased raw features (needs the `concept-erasure` package)."""

    max_samples: int | None = None
    """Use at most this many train and this many test samples (the first ones each loader yields); None = all."""

    smoke_samples: int = 512
    """Cap on `max_samples` (and on a run's validation samples) in a smoke run (fit.max_steps below SMOKE_STEPS =
    100), so that checking the pipeline end to end stays fast: probing a barely trained head on thousands of samples
    measures nothing."""

    tsne_samples: int = 1000
    """Test samples embedded by t-SNE for the figure (at most); 0 skips the t-SNE figure."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.mlp_hidden or any(not isinstance(h, int) or h < 1 for h in self.mlp_hidden):
            raise ValueError(f"EvalConfig.mlp_hidden must be a non-empty list of ints >= 1, got {self.mlp_hidden!r}.")
        self.mlp_hidden = tuple(self.mlp_hidden)
        for key in ("mlp_max_iter", "linear_max_iter", "smoke_samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"EvalConfig.{key} must be >= 1, got {getattr(self, key)!r}.")
        if self.max_samples is not None and self.max_samples < 10:
            raise ValueError(f"EvalConfig.max_samples must be None or >= 10, got {self.max_samples!r}.")
        if self.tsne_samples < 0:
            raise ValueError(f"EvalConfig.tsne_samples must be >= 0, got {self.tsne_samples!r}.")
        if not self.ridge_alpha >= 0:
            raise ValueError(f"EvalConfig.ridge_alpha must be >= 0, got {self.ridge_alpha!r}.")

    def sample_cap(self, max_steps: int | None) -> int | None:
        """Samples per split to evaluate on for a run trained with `max_steps` (smoke runs are capped)."""
        if not is_smoke_run(max_steps):
            return self.max_samples
        return min(self.max_samples or self.smoke_samples, self.smoke_samples)


__all__ = ["Attribute", "HeadConfig", "FitConfig", "EvalConfig", "SMOKE_STEPS", "is_smoke_run", "ConfigError",
           "MissingFileError", "validate", "check_fields", "check_value", "check_choice", "known_keys", "matches",
           "type_name", "got"]
