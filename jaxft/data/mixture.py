"""Dataset mixtures: the `data.train` mixture syntax and the deterministic stream of draws.

A *draw* picks one example from one dataset. Draw p of the stream comes from dataset
`dataset_of(p)`: i.i.d. with the mixture weights (as `datasets.interleave_datasets` with
probabilities), generated in blocks of 4096 from (seed, block) so any position can be
recomputed without replaying the stream. Each dataset keeps its own count of draws k; its k-th
draw is `permutation(seed, dataset, epoch=k // size)[k % size]`, so every dataset is used
exactly once per its own epoch and reshuffled for the next. With one dataset the stream is
simply the concatenation of per-epoch shuffles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxft.errors import ConfigError

_MIX_BLOCK = 4096
# Distinct streams of randomness derived from the one seed.
_TAG_MIX, _TAG_PERM = 0x6D6978, 0x7065726D

_SYNTAX = ('expected one source ("data/train.jsonl") or a weighted mixture '
           '("general.jsonl=0.312,math.jsonl=0.466,code.jsonl=0.222")')


def parse_mixture(spec: str, field: str = "data.train",
                  require_weights: bool = True) -> list[tuple[str, float]]:
    """Parse "a.jsonl=0.3,b.jsonl=0.7" into [(source, weight)] with weights summing to 1.

    A single source may omit its weight (weight 1). Several sources need a positive weight
    each, unless `require_weights` is False (eval sets: a missing weight is 1). Errors name
    `field` and show the expected syntax.
    """
    if not spec or not spec.strip():
        raise ConfigError(f"{field} is empty: {_SYNTAX}")
    parts = [p.strip() for p in spec.split(",")]
    out = []
    for part in parts:
        source, eq, weight = part.rpartition("=") if "=" in part else (part, "", "")
        if len(parts) == 1 and eq and not _is_number(weight):
            source, eq = part, ""  # one source whose path happens to contain "="
        source = source.strip()
        if not source:
            raise ConfigError(f"{field}: empty source in {spec!r}; {_SYNTAX}")
        if not eq:
            if len(parts) > 1 and require_weights:
                raise ConfigError(
                    f"{field}: source {source!r} in mixture {spec!r} has no weight; {_SYNTAX}")
            out.append((source, 1.0))
            continue
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(
                f"{field}: weight {weight.strip()!r} of {source!r} is not a number; {_SYNTAX}"
            ) from None
        if not np.isfinite(w) or w <= 0:
            raise ConfigError(f"{field}: weight of {source!r} must be a finite number > 0, got {weight.strip()}")
        out.append((source, w))
    total = sum(w for _, w in out)
    return [(s, w / total) for s, w in out]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def seeded_rng(*key: int) -> np.random.Generator:
    """A numpy Generator that is a pure function of the integers `key` (e.g. seed, tag, epoch)."""
    return np.random.default_rng(np.random.SeedSequence([k % 2**63 for k in key]))


class DrawStream:
    """The deterministic, infinite sequence of draws over datasets of `sizes` with `weights`.

    Pure function of (sizes, weights, seed): every host computes the same stream. The caller
    keeps the position and per-dataset draw counts (they are the iterator state).
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("need one weight per dataset and at least one dataset")
        if min(sizes) <= 0:
            raise ValueError(f"every dataset needs examples; sizes {list(sizes)}")
        self.sizes = [int(n) for n in sizes]
        w = np.asarray(weights, np.float64)
        self.weights = w / w.sum()
        self._cum = np.cumsum(self.weights)
        self.seed = int(seed)
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._blocks: dict[int, np.ndarray] = {}

    def permutation(self, dataset: int, epoch: int) -> np.ndarray:
        """[size] int64 order of `dataset`'s examples in its `epoch`."""
        key = (dataset, epoch)
        if key not in self._perms:
            if len(self._perms) >= 4 * len(self.sizes):  # only the current epochs are hot
                self._perms.clear()
            self._perms[key] = seeded_rng(self.seed, _TAG_PERM, dataset, epoch).permutation(
                self.sizes[dataset])
        return self._perms[key]

    def _block(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            if len(self._blocks) >= 4:
                self._blocks.clear()
            u = seeded_rng(self.seed, _TAG_MIX, b).random(_MIX_BLOCK)
            # side="right" and the clip keep a u that rounds to the last edge in range.
            ids = np.searchsorted(self._cum, u, side="right")
            self._blocks[b] = np.minimum(ids, len(self.sizes) - 1)
        return self._blocks[b]

    def dataset_of(self, start: int, count: int) -> np.ndarray:
        """[count] int64: which dataset draws start .. start+count-1 come from."""
        if len(self.sizes) == 1:
            return np.zeros(count, np.int64)
        first, last = start // _MIX_BLOCK, (start + count - 1) // _MIX_BLOCK
        ids = np.concatenate([self._block(b) for b in range(first, last + 1)])
        offset = start - first * _MIX_BLOCK
        return ids[offset:offset + count]

    def take(self, start: int, counts: Sequence[int], count: int):
        """Draws start .. start+count-1, given each dataset's draw count `counts` before them.

        Returns (datasets [count], examples [count], counts after): dataset id and position of
        the example within its dataset for each draw.
        """
        datasets = self.dataset_of(start, count)
        examples = np.empty(count, np.int64)
        after = [int(c) for c in counts]
        for d, size in enumerate(self.sizes):
            sel = np.flatnonzero(datasets == d)
            if sel.size == 0:
                continue
            k = after[d] + np.arange(sel.size)
            epochs, offsets = k // size, k % size
            for e in np.unique(epochs):
                m = epochs == e
                examples[sel[m]] = self.permutation(d, int(e))[offsets[m]]
            after[d] += int(sel.size)
        return datasets, examples, after
