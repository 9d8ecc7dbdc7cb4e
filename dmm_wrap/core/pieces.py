"""How many pieces an alignment stage cuts each group into, when the user does not say: the silhouette score's choice
(scikit-learn), pooled over a few groups."""

from __future__ import annotations

from collections import Counter

import numpy as np

AUTO_CLUSTERS = range(2, 13)
"""Cluster counts the silhouette score chooses from when `clusters` is None."""
SILHOUETTE_SAMPLE = 2000
"""Samples of one group the silhouette score is computed on (its cost is quadratic)."""
SILHOUETTE_GROUPS = 5
"""Groups whose silhouette choices of the piece count are pooled (`choose_pieces`)."""


def choose_pieces(x: np.ndarray, groups: np.ndarray, present: list[int], seed: int) -> int:
    """The piece count of a stage: the silhouette score's choice (`choose_clusters`) in each of up to
    `SILHOUETTE_GROUPS` groups spread over `present`, and the most common of them (the smallest on a tie). One group's
    choice alone can split a class in two: on the suite's `digits_writers` problem (val split, seed 1) the first of
    48 groups chose 11 pieces where eleven others (every fourth) chose 10, and the task fell to 0.960 (0.981 with
    the pooled choice)."""
    picks = [present[round(i)] for i in np.linspace(0, len(present) - 1, min(SILHOUETTE_GROUPS, len(present)))]
    counts = Counter(choose_clusters(x[groups == g], seed) for g in dict.fromkeys(picks))
    return min(counts, key=lambda k: (-counts[k], k))


def choose_clusters(x: np.ndarray, seed: int) -> int:
    """The count in `AUTO_CLUSTERS` whose k-means clustering of (the first `SILHOUETTE_SAMPLE` rows of) x has the
    best silhouette score."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    sample = x[:SILHOUETTE_SAMPLE]
    best, chosen = -np.inf, AUTO_CLUSTERS[0]
    for k in AUTO_CLUSTERS:
        if k >= len(sample):
            break
        labels = KMeans(k, n_init=3, random_state=seed).fit_predict(sample)
        if len(set(labels)) < 2:
            continue
        score = silhouette_score(sample, labels)
        if score > best:
            best, chosen = score, k
    return chosen


__all__ = ["AUTO_CLUSTERS", "choose_clusters", "choose_pieces"]
