"""Training, validation and test subsets by crystal.

Crops of the same crystal are strongly correlated (neighbouring positions,
consecutive omega angles), so the subsets are drawn by crystal, as in the
thesis: every crystal (``crystal_id``) goes to exactly one subset, and the
numbers of crystals are split 60/20/20. The split is seeded and stored, with
its crystal ids, in the model file, so the test set of a model can always be
found again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

SUBSETS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Split:
    """Crystal ids of each subset.

    Attributes
    ----------
    train, validation, test : tuple of str
    seed : int or None
    fractions : (float, float, float)
    """

    train: tuple
    validation: tuple
    test: tuple
    seed: int | None = None
    fractions: tuple = DEFAULT_FRACTIONS
    rows: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        sets = [set(getattr(self, name)) for name in SUBSETS]
        for i in range(3):
            for j in range(i + 1, 3):
                shared = sets[i] & sets[j]
                if shared:
                    raise ValueError(
                        f"crystals in both {SUBSETS[i]} and {SUBSETS[j]}: {sorted(shared)[:5]}"
                    )

    def subset_of(self, crystal_ids) -> np.ndarray:
        """The subset name of each crystal id (``""`` for ids in no subset)."""
        lookup = {cid: name for name in SUBSETS for cid in getattr(self, name)}
        return np.array([lookup.get(str(c), "") for c in crystal_ids], dtype=object)

    def indices(self, crystal_ids) -> dict:
        """Row indices of each subset: ``{"train": array, "validation": array, "test": array}``."""
        subset = self.subset_of(crystal_ids)
        return {name: np.flatnonzero(subset == name) for name in SUBSETS}

    def with_rows(self, crystal_ids) -> "Split":
        """A copy that also records the number of rows of each subset."""
        counts = {name: int(len(idx)) for name, idx in self.indices(crystal_ids).items()}
        return Split(self.train, self.validation, self.test, self.seed, self.fractions, counts)

    def to_config(self) -> dict:
        return {
            "seed": self.seed,
            "fractions": list(self.fractions),
            "train": list(self.train),
            "validation": list(self.validation),
            "test": list(self.test),
            "rows": dict(self.rows),
        }

    @classmethod
    def from_config(cls, config: dict) -> "Split":
        return cls(
            train=tuple(config["train"]),
            validation=tuple(config["validation"]),
            test=tuple(config["test"]),
            seed=config.get("seed"),
            fractions=tuple(config.get("fractions", DEFAULT_FRACTIONS)),
            rows=dict(config.get("rows", {})),
        )


def split_by_crystal(crystal_ids, seed: int = 0, fractions=DEFAULT_FRACTIONS) -> Split:
    """Split the distinct crystal ids at random into train, validation and test.

    Parameters
    ----------
    crystal_ids : sequence of str
        One per row (repeats allowed).
    seed : int
    fractions : (float, float, float)
        Shares of crystals; validation and test get at least one crystal
        each when there are three or more.

    Returns
    -------
    Split
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative shares summing to 1, not {fractions}")
    ids = sorted({str(c) for c in crystal_ids})
    if len(ids) < 3:
        raise ValueError(f"need at least 3 distinct crystals to split by crystal, got {len(ids)}: {ids}")
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    n = len(ids)
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    if fractions[1] > 0:
        n_val = max(1, n_val)
    if fractions[2] > 0:
        n_test = max(1, n_test)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} crystals are too few for the fractions {fractions}")
    split = Split(
        train=tuple(sorted(shuffled[:n_train])),
        validation=tuple(sorted(shuffled[n_train : n_train + n_val])),
        test=tuple(sorted(shuffled[n_train + n_val :])),
        seed=seed,
        fractions=fractions,
    )
    return split.with_rows(crystal_ids)


def resolve_split(split, crystal_ids, seed: int = 0, fractions=DEFAULT_FRACTIONS) -> Split:
    """The split a training run uses, with its row counts.

    Parameters
    ----------
    split : Split, dict or None
        A given split (or its ``to_config``); None makes one by crystal
        with ``seed`` and ``fractions`` (:func:`split_by_crystal`).
    crystal_ids : (N,) array_like
        Crystal of each row of the training data.
    """
    if split is None:
        split = split_by_crystal(crystal_ids, seed=seed, fractions=fractions)
    elif not isinstance(split, Split):
        split = Split.from_config(split)
    unknown = sorted({str(c) for c in crystal_ids} - {*split.train, *split.validation, *split.test})
    if unknown:
        log.warning("%d crystals of the data are in none of the given split's subsets and are left out (%s): "
                    "make a new split (split=None) to use them", len(unknown),
                    ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else ""))
    return split.with_rows(crystal_ids)
