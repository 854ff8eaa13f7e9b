"""How far a shadow version's answers agree with the serving version's, per request and in sum."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share theirs), as Spearman's coefficient needs."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return np.asarray(sums[inverse] / counts[inverse])


def rank_agreement(serving: np.ndarray, shadow: np.ndarray) -> float:
    """Spearman's rank correlation of two score lists over the same documents; 1.0 when both rank alike
    (including one document, or all scores tied in both)."""
    a, b = _ranks(np.asarray(serving, np.float64)), _ranks(np.asarray(shadow, np.float64))
    a, b = a - a.mean(), b - b.mean()
    na, nb = float(np.sqrt((a * a).sum())), float(np.sqrt((b * b).sum()))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float((a * b).sum() / (na * nb))


def top1_agreement(serving: list[str], shadow: list[str]) -> float:
    """The share of texts whose best label is the same."""
    if not serving:
        return 1.0
    return sum(a == b for a, b in zip(serving, shadow, strict=True)) / len(serving)


@dataclass
class AgreementStats:
    """One shadow version's comparisons on this ingress replica (``/v1/models``); updated on its event loop."""

    compared: int = 0
    total: float = 0.0
    lowest: float = 1.0
    skipped: int = 0  # not scored: refused by admission control, failed, or past the deadline

    def add(self, value: float) -> None:
        self.compared += 1
        self.total += value
        self.lowest = min(self.lowest, value)

    def as_dict(self) -> dict[str, float | int | None]:
        mean = self.total / self.compared if self.compared else None
        return {
            "compared": self.compared,
            "mean_agreement": None if mean is None else round(mean, 6),
            "lowest_agreement": round(self.lowest, 6) if self.compared else None,
            "skipped": self.skipped,
        }
