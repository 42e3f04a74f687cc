"""Error-rate intervals and inter-annotator agreement for qualification pilots."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

# The 95 % two-sided normal quantile, rounded as the Wilson interval is usually reported.
Z_95 = 1.96


def wilson_interval(failures: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (failures out of n).

    ``failures`` and ``n`` may be effective counts (a weighted rate times an effective
    sample size), as a stratified sample's population estimate gives them.

    Unlike the normal approximation it stays inside [0, 1] and is informative at 0 or n
    failures, which is the usual case in a pilot of a good model.
    """
    if n <= 0:
        raise ValueError("the Wilson interval needs at least one labelled item")
    if not 0 <= failures <= n:
        raise ValueError(f"failures must be between 0 and n={n}, got {failures}")
    p = failures / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two annotators' labels on the same items.

    None when chance agreement is 1 (both gave one and the same label to every item):
    kappa is undefined there, and reporting 0 or 1 would both mislead.
    """
    if not pairs:
        return None
    n = len(pairs)
    observed = sum(1 for a, b in pairs if a == b) / n
    first = Counter(a for a, _ in pairs)
    second = Counter(b for _, b in pairs)
    expected = sum(first[c] * second[c] for c in set(first) | set(second)) / (n * n)
    if math.isclose(expected, 1.0):
        return None
    return (observed - expected) / (1 - expected)
