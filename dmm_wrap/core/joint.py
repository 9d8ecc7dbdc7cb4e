"""Joint groups: every combination of the attributes' classes and of quantile bins of their continuous values, as one
categorical attribute, so that one piecewise alignment (`dmm_wrap.core.alignment`) moves each combination's pieces
onto the pooled ones at once.

Aligning attributes one after the other lets a later stage undo an earlier one: on the leakage suite's digits problem
(val, seed 0) site, then rotation, then width left the site at 0.588 and the digit at 0.929, while the joint groups
(3 sites x 4 rotation bins x 4 width bins) gave site 0.340, rotation R^2 -0.056, width -0.109, digit 0.994, with B
given (`benchmarks/README.md`, "Joint groups").

Example:
    >>> joint = JointGroups.fit(b, attributes, bins=4)   # edges from a sample's continuous columns
    >>> ids = joint(b)                                     # [N] ints in [0, joint.count)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..config import Attribute


def check_bins(bins: object) -> None:
    """Raise unless `bins` is a usable count of quantile bins (an int >= 2)."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2 (quantile bins of each continuous attribute), got {bins!r}.")


def quantile_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """The inner edges of `bins` quantile bins of `values` (fewer where values repeat); a value's bin is
    `searchsorted(edges, value, side="right")`."""
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


@dataclass
class JointGroups:
    """The joint group of each row of B: a mixed-radix number of its attributes' classes and bins, in order."""

    attributes: tuple[Attribute, ...]
    edges: list[Tensor | None]
    """Per attribute: the inner quantile edges of a continuous one's bins, None for a categorical one."""

    @classmethod
    def fit(cls, b: Tensor, attributes: tuple[Attribute, ...], bins: int) -> JointGroups:
        """Quantile edges of each continuous column of b [N, A] (`bins` bins; fewer where values repeat)."""
        check_bins(bins)
        edges: list[Tensor | None] = []
        for k, attr in enumerate(attributes):
            if attr.kind == "categorical":
                edges.append(None)
                continue
            edges.append(torch.from_numpy(quantile_edges(b[:, k].double().cpu().numpy(), bins)))
        return cls(attributes, edges)

    @property
    def sizes(self) -> list[int]:
        """Classes (categorical) or bins (continuous) of each attribute."""
        return [int(a.num_classes or 0) if e is None else len(e) + 1 for a, e in zip(self.attributes, self.edges)]

    @property
    def count(self) -> int:
        """Number of joint groups: the product of `sizes`."""
        return int(np.prod(self.sizes))

    @property
    def name(self) -> str:
        """The joint attribute's name, e.g. "site x rotation"."""
        return " x ".join(a.name for a in self.attributes)

    def attribute(self) -> Attribute:
        """The joint groups as one categorical attribute."""
        return Attribute(self.name, "categorical", self.count)

    def __call__(self, b: Tensor) -> Tensor:
        """Joint group ids [N] (int64) of attribute rows b [N, A]."""
        ids = torch.zeros(len(b), dtype=torch.long, device=b.device)
        for k, (size, edges) in enumerate(zip(self.sizes, self.edges)):
            col = b[:, k]
            code = col.long() if edges is None else torch.bucketize(
                col.double().contiguous(), edges.to(col.device), right=True)
            ids = ids * size + code.clamp(0, size - 1)
        return ids


__all__ = ["JointGroups", "check_bins", "quantile_edges"]
