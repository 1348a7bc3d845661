"""What a benchmark run reports (`BenchmarkResult`) and the pass@k estimator it reports with: what
`base` (the interface) and `runner` (which builds results) both need, kept below them both."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class BenchmarkResult:
    """What `jaxft eval --json` writes: {"benchmark", "model", "n", "metrics", "settings"};
    `samples` (one dict per completion: prompt, completion, extracted, reference, correct, error)
    is what --samples-out writes, one JSON line each."""

    benchmark: str
    n: int
    metrics: dict[str, float]
    settings: dict
    samples: list[dict] = dataclasses.field(default_factory=list)
    model: str | None = None

    def summary(self) -> dict:
        return {"benchmark": self.benchmark, "model": self.model, "n": self.n, "metrics": self.metrics,
                "settings": self.settings}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. (2021), eq. 1: the chance that at least one
    of k completions drawn without replacement from n, of which c are correct, is correct:
    1 - C(n - c, k) / C(n, k), computed as a product (no large binomials)."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
