"""Gaussian pieces: shrunk covariance estimates and the optimal-transport map between two centred Gaussians, what
`dmm_wrap.core.alignment` maps each matched piece with."""

from __future__ import annotations

import numpy as np

from ..config import AlignShrinkage


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


__all__ = ["gaussian_map", "oas_shrinkage", "shrink_covariance"]
