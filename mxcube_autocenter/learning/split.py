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
from dataclasses import dataclass, field, replace

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
    trained_before : tuple of str
        Crystals the models this one was fine-tuned from were trained on
        (their ``train`` and ``trained_before``), here or in other datasets:
        the weights have seen them, so they are in no held-out subset.
    """

    train: tuple
    validation: tuple
    test: tuple
    seed: int | None = None
    fractions: tuple = DEFAULT_FRACTIONS
    rows: dict = field(default_factory=dict, compare=False)
    trained_before: tuple = ()

    def __post_init__(self):
        for name in (*SUBSETS, "trained_before"):
            ids = getattr(self, name)
            if isinstance(ids, str) or not all(isinstance(c, str) for c in ids):
                raise ValueError(f"the split's {name} must be a list of crystal ids (strings), not {ids!r:.80}")
        before = set(self.trained_before) & {*self.validation, *self.test}
        if before:
            raise ValueError(f"crystals held out (validation, test) that an earlier model was trained on: "
                             f"{sorted(before)[:5]}")
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
        return replace(self, rows=counts)

    def trained_on(self) -> set:
        """Every crystal the weights of a model with this split have been trained on."""
        return {*self.train, *self.trained_before}

    def to_config(self) -> dict:
        config = {
            "seed": self.seed,
            "fractions": list(self.fractions),
            "train": list(self.train),
            "validation": list(self.validation),
            "test": list(self.test),
            "rows": dict(self.rows),
        }
        if self.trained_before:
            config["trained_before"] = list(self.trained_before)
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Split":
        for name in (*SUBSETS, "trained_before"):
            if not isinstance(config.get(name, ()), (list, tuple)):
                raise ValueError(f"the split's {name} must be a list of crystal ids, not {config[name]!r:.80}")
        return cls(
            train=tuple(config["train"]),
            validation=tuple(config["validation"]),
            test=tuple(config["test"]),
            seed=config.get("seed"),
            fractions=tuple(config.get("fractions", DEFAULT_FRACTIONS)),
            rows=dict(config.get("rows", {})),
            trained_before=tuple(config.get("trained_before", ())),
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


def extend_split(initial: Split, crystal_ids, seed: int = 0, fractions=DEFAULT_FRACTIONS) -> Split:
    """The split for fine-tuning a model whose split is ``initial`` on data of these crystals.

    Crystals of ``initial``'s subsets keep theirs, so that a model fine-tuned
    on a dataset with more recordings appended is never judged on crystals it
    was trained on; crystals its weights have seen before
    (``initial.trained_before``) go to training. The others, new, are split by
    ``fractions`` among themselves (:func:`split_by_crystal`; all to training
    when fewer than three, but one to validation where none of ``initial``'s
    validation crystals is in the data). Every crystal the initial weights were trained on
    is recorded in ``trained_before``.

    Parameters
    ----------
    initial : Split
        The initial model's split.
    crystal_ids : sequence of str
        One per row of the data (repeats allowed).
    seed : int
    fractions : (float, float, float)

    Returns
    -------
    Split
    """
    ids = {str(c) for c in crystal_ids}
    seen = initial.trained_on()
    kept = {name: {c for c in getattr(initial, name) if c in ids} for name in SUBSETS}
    kept["train"] |= ids & seen
    new = ids - seen - set(initial.validation) - set(initial.test)
    if len(new) >= 3:
        added = split_by_crystal(sorted(new), seed=seed, fractions=fractions)
    elif new and not kept["validation"]:
        # None of the initial model's validation crystals is in this data: early stopping needs one, a new one.
        first, *others = sorted(new)
        added = Split(tuple(others), (first,), ())
    else:
        added = Split(tuple(new), (), ())
    split = Split(
        train=tuple(sorted(kept["train"] | set(added.train))),
        validation=tuple(sorted(kept["validation"] | set(added.validation))),
        test=tuple(sorted(kept["test"] | set(added.test))),
        seed=seed,
        fractions=tuple(float(f) for f in fractions),
        trained_before=tuple(sorted(seen)),
    )
    return split.with_rows(crystal_ids)
