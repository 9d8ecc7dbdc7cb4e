"""Gaussian pieces: shrunk covariance estimates and the optimal-transport map between two centred Gaussians, what
`dmm_wrap.core.alignment` maps each matched piece with, and the covariance it maps a matched piece's groups onto."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from ..config import AlignShrinkage

TargetCovariance = Literal["pooled", "geometric", "harmonic"]
"""What each group's piece is mapped onto: the covariance of the pooled piece's rows ("pooled"), or a mean of the
groups' own covariances plus the spread of their means: the log-Euclidean geometric mean ("geometric") or the harmonic
mean ("harmonic"; `mean_target`)."""


def oas_shrinkage(cov: np.ndarray, n: float) -> float:
    """The Oracle Approximating Shrinkage fraction (Chen, Wiesel, Eldar and Hero, 2010; scikit-learn's `oas`) of a
    covariance estimated from `n` rows: near 0 when n is large against the dimension, up to 1 when it is not. From
    the covariance alone, so that streamed moments get it too (the fraction does not depend on the covariance's scale,
    so 1/n or 1/(n-1) normalisation gives the same). `cov` may be the variances [D] alone (a diagonal covariance)."""
    dim = len(cov)
    if dim == 1:
        return 0.0
    # mean of the squared entries and mean variance; for variances alone the off-diagonal entries are 0
    alpha = np.sum(cov ** 2) / dim ** 2
    mu = (cov if cov.ndim == 1 else np.diag(cov)).mean()
    den = (n + 1) * (alpha - mu ** 2 / dim)
    return 1.0 if den <= 0 else float(min((alpha + mu ** 2) / den, 1.0))


def shrink_covariance(cov: np.ndarray, shrinkage: AlignShrinkage, n: float | None = None) -> np.ndarray:
    """`cov` shrunk towards its mean variance by the fraction `shrinkage`, or by `oas_shrinkage(cov, n)` ("oas": `n`
    is then the estimate's row count): a covariance matrix [D, D], or the variances [D] alone (a diagonal
    covariance)."""
    if shrinkage == "oas":
        if n is None:
            raise ValueError('shrinkage="oas" needs the row count n the covariance was estimated from.')
        shrinkage = oas_shrinkage(cov, n)
    if cov.ndim == 1:
        return (1 - shrinkage) * cov + shrinkage * max(cov.mean(), 1e-6)
    scale = max(np.trace(cov) / len(cov), 1e-6)
    return (1 - shrinkage) * cov + shrinkage * scale * np.eye(len(cov))


def gaussian_map(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The optimal-transport map between centred Gaussians: S^-1/2 (S^1/2 T S^1/2)^1/2 S^-1/2."""
    w, v = np.linalg.eigh(source)
    w = np.clip(w, 1e-10, None)
    root, inv_root = (v * np.sqrt(w)) @ v.T, (v / np.sqrt(w)) @ v.T
    w2, v2 = np.linalg.eigh(root @ target @ root)
    middle = (v2 * np.sqrt(np.clip(w2, 0, None))) @ v2.T
    return inv_root @ middle @ inv_root


def check_target(value: object, name: str = "target") -> None:
    """Raise unless `value` is a `TargetCovariance`."""
    if value not in get_args(TargetCovariance):
        raise ValueError(f"{name} must be one of {get_args(TargetCovariance)}, got {value!r}.")


def mean_target(means: np.ndarray, covs: np.ndarray, counts: np.ndarray, estimated: np.ndarray,
                kind: Literal["geometric", "harmonic"]) -> np.ndarray:
    """The covariance that one matched piece's groups are mapped onto with target "geometric" or "harmonic": that
    mean of their own covariances, plus the spread of their means about the pooled mean (weighted by row counts).

    The pooled piece's covariance is the arithmetic mean of the groups' covariances plus that spread. Where one
    group's piece is thin in a direction (a blur removes fine detail), the arithmetic mean stays thick there, and the
    thin group's map multiplies its small variation by up to 40 (the default digits job): rows of writers the fit
    never saw land far from their piece, across the task's boundaries. The harmonic mean follows the thinnest group,
    so the thick ones are narrowed instead, and what they carry beyond the task is narrowed with them; the geometric
    mean (exp of the mean log, Arsigny et al. 2007) lies between. `means` [G, D], `covs` [G, D, D] (or variances
    [G, D]), `counts` [G], `estimated` [G] (bool): the groups whose covariance enters the mean (enough rows)."""
    weight = counts / counts.sum()
    deviation = means - weight @ means
    use = estimated & (counts > 0)
    if not use.any():
        raise ValueError("mean_target needs at least one group with an estimated covariance.")
    inner = weight[use] / weight[use].sum()
    power = {"geometric": 0.0, "harmonic": -1.0}[kind]
    if covs.ndim == 2:  # variances alone
        floored = np.clip(covs[use], 1e-10, None)
        middle = np.exp(inner @ np.log(floored)) if power == 0 else 1 / (inner @ (1 / floored))
        return middle + weight @ deviation ** 2
    middle = _power(sum(w * _power(c, power) for w, c in zip(inner, covs[use])), power, inverse=True)
    return middle + (deviation.T * weight) @ deviation


def _power(cov: np.ndarray, power: float, inverse: bool = False) -> np.ndarray:
    """A symmetric matrix's power (0: its logarithm), eigenvalues floored at 1e-10 of the largest; with `inverse`,
    the inverse function (0: the exponential) of a symmetric matrix."""
    w, v = np.linalg.eigh(cov)
    if inverse:
        return (v * (np.exp(w) if power == 0 else np.clip(w, 1e-300, None) ** (1 / power))) @ v.T
    w = np.clip(w, max(w.max(), 1e-30) * 1e-10, None)
    return (v * (np.log(w) if power == 0 else w ** power)) @ v.T


__all__ = ["TargetCovariance", "check_target", "gaussian_map", "mean_target", "oas_shrinkage",
           "shrink_covariance"]
