"""Evaluation protocols: which subjects train, select the epoch, and test, in each fold.

``paper``
    AttnSleep's own subject-wise k-fold split (utils/util.py ``load_folds_data`` of
    emadeldeen24/AttnSleep): subjects in sorted order, reordered by the published permutation,
    then ``numpy.array_split`` into folds; fold k tests the k-th part (both nights of each subject).
    Their trainer keeps the epoch with the best accuracy *on the test fold* and computes class
    weights from train+test labels. Reproduced as published and labelled
    ``"paper (optimistic: model selection and class weights use the test fold)"``.
``clean``
    The same test folds; the epoch is selected on validation subjects drawn (seeded) from the
    training subjects (``val_fraction``, at least one), class weights come from training labels
    only, and the test fold is used once, after training.
``time-block``
    For a single night (the bundled sample): contiguous blocks of the night are the test folds.
    Neighbouring epochs are strongly correlated, so the figures are NOT comparable to the paper's
    subject-wise ones; :func:`time_block_splits` says so in every split's label.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "PAPER_PERMUTATIONS",
    "PAPER_N_FOLDS",
    "PROTOCOL_LABELS",
    "FoldSplit",
    "paper_folds",
    "make_splits",
    "time_block_splits",
    "class_weight_counts",
]

# utils/r_permute_20.npy and r_permute_78.npy of emadeldeen24/AttnSleep: positions in the sorted
# list of the dataset's subjects.
PAPER_PERMUTATIONS: dict[str, list[int]] = {
    "sleep-edf-20": [14, 5, 4, 17, 8, 7, 19, 12, 0, 15, 16, 9, 11, 10, 3, 1, 6, 18, 2, 13],
    "sleep-edf-78": [
        42, 11, 19, 46, 24, 47, 61, 71, 58, 66, 6, 22, 31, 5, 12, 54, 4, 67, 37, 68, 48, 39, 13, 15,
        20, 23, 70, 18, 3, 64, 55, 62, 27, 7, 0, 36, 40, 44, 50, 2, 75, 43, 26, 1, 29, 14, 72, 57, 73,
        59, 32, 65, 34, 63, 69, 33, 35, 77, 53, 16, 74, 56, 28, 17, 52, 30, 76, 51, 49, 25, 21, 38, 8,
        41, 9, 10, 60, 45,
    ],
}

# Number of folds in the AttnSleep paper: 20 for Sleep-EDF-20 (config.json, one subject per fold);
# 10 for Sleep-EDF-78 and SHHS (paper text; the repository's config.json only shows 20).
PAPER_N_FOLDS: dict[str, int] = {"sleep-edf-20": 20, "sleep-edf-78": 10, "shhs": 10}

PROTOCOL_LABELS = {
    "paper": "paper (optimistic: model selection and class weights use the test fold)",
    "clean": "clean (selection on validation subjects, class weights from training labels)",
    "time-block": "time-block within one night (NOT comparable to the paper's subject-wise folds)",
}


@dataclass
class FoldSplit:
    """Subjects (or, for time-block splits, epoch indices) of one fold.

    ``val`` is what selects the epoch; in the paper protocol it is the test fold itself.
    ``weight_from`` names the sets whose labels give the class weights.
    """

    fold: int
    protocol: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    weight_from: tuple[str, ...] = ("train",)
    label: str = ""
    unit: str = "subject"
    extra: dict = field(default_factory=dict)

    @property
    def val_is_test(self) -> bool:
        return self.protocol == "paper"


def paper_folds(subjects, dataset: str | None = None, *, permutation=None, n_folds: int | None = None) -> list[np.ndarray]:
    """AttnSleep's test folds: sorted unique subjects, permuted, ``array_split`` into folds.

    Parameters
    ----------
    subjects : iterable of int
        Available subject ids (duplicates ignored). For Sleep-EDF-78 the ids skip missing
        subjects (no 39, 68, 69, 78, 79): the permutation indexes the *sorted available* list, as
        their code indexes the sorted file list.
    dataset : {"sleep-edf-20", "sleep-edf-78"}, optional
        Selects the published permutation and number of folds.
    permutation : sequence of int, optional
        Overrides the published permutation (a permutation of ``range(n_subjects)``).
    n_folds : int, optional
        Overrides the number of folds.

    Raises
    ------
    ValueError
        If no permutation is known or its length differs from the number of subjects.
    """
    from sleeplib.data.dataset import subject_folds

    unique = np.unique(np.asarray(list(subjects), dtype=np.int64))
    if permutation is None:
        if dataset not in PAPER_PERMUTATIONS:
            raise ValueError(
                f"no published permutation for dataset {dataset!r} (known: {sorted(PAPER_PERMUTATIONS)}); "
                "pass permutation=... or use protocol='clean'"
            )
        permutation = PAPER_PERMUTATIONS[dataset]
    if len(permutation) != len(unique):
        raise ValueError(
            f"the {dataset or 'given'} permutation has {len(permutation)} entries but {len(unique)} subjects "
            f"were given ({unique.tolist()[:10]}...); the paper split needs the full dataset's subjects"
        )
    if n_folds is None:
        n_folds = PAPER_N_FOLDS.get(dataset, len(unique))
    return subject_folds(unique, n_folds, permutation=permutation)


def make_splits(
    subjects,
    protocol: str = "paper",
    *,
    dataset: str | None = None,
    n_folds: int | None = None,
    permutation=None,
    val_fraction: float = 0.1,
    seed: int = 123,
) -> list[FoldSplit]:
    """Train/selection/test subjects of every fold under ``protocol`` ("paper" or "clean").

    Without a published permutation for ``dataset`` (e.g. synthetic data or a subset), both
    protocols fall back to a seeded permutation with ``n_folds`` folds (default: one subject per
    fold); such a "paper" split reproduces the paper's *procedure*, not its folds.

    Parameters
    ----------
    val_fraction : float
        Clean protocol: share of each fold's training subjects held out for model selection
        (rounded, at least 1, and at least one subject left to train on).
    seed : int
        Seeds the fallback permutation and the choice of validation subjects.
    """
    from sleeplib.data.dataset import subject_folds

    if protocol not in ("paper", "clean"):
        raise ValueError(f"protocol must be 'paper' or 'clean' for subject splits, got {protocol!r}; "
                         "for one night use time_block_splits()")
    unique = np.unique(np.asarray(list(subjects), dtype=np.int64))
    if len(unique) < 2:
        raise ValueError(f"subject-wise folds need at least 2 subjects, got {unique.tolist()}; "
                         "for one night use time_block_splits()")
    if permutation is not None or (dataset in PAPER_PERMUTATIONS and len(PAPER_PERMUTATIONS[dataset]) == len(unique)):
        tests = paper_folds(unique, dataset, permutation=permutation, n_folds=n_folds)
    else:
        tests = subject_folds(unique, n_folds or len(unique), seed=seed)
    rng = np.random.default_rng(seed)
    splits = []
    for k, test in enumerate(tests):
        rest = np.setdiff1d(unique, test)
        if protocol == "paper":
            splits.append(FoldSplit(k, "paper", rest, test, test, ("train", "test"), PROTOCOL_LABELS["paper"]))
            continue
        if len(rest) < 2:
            raise ValueError(f"fold {k} leaves {len(rest)} training subject(s); the clean protocol needs 2+ "
                             "to hold out validation subjects")
        n_val = min(max(1, int(round(val_fraction * len(rest)))), len(rest) - 1)
        val = np.sort(rng.choice(rest, size=n_val, replace=False))
        train = np.setdiff1d(rest, val)
        splits.append(FoldSplit(k, "clean", train, val, test, ("train",), PROTOCOL_LABELS["clean"]))
    return splits


def time_block_splits(n_epochs: int, n_folds: int = 5, val_fraction: float = 0.1, gap: int = 0) -> list[FoldSplit]:
    """Folds of one night made of contiguous blocks of epochs.

    Fold k tests the k-th of ``n_folds`` contiguous blocks; the validation block is the
    ``val_fraction`` of the remaining epochs right after the test block (wrapping around), so it is
    also contiguous. ``gap`` epochs on each side of the test block are dropped from training to
    weaken the leakage from neighbouring epochs. Arrays hold epoch indices (``unit="epoch"``).
    """
    if n_folds < 2 or n_epochs < 3 * n_folds:
        raise ValueError(f"need n_folds >= 2 and at least 3 epochs per fold, got n_folds={n_folds}, n_epochs={n_epochs}")
    blocks = np.array_split(np.arange(n_epochs), n_folds)
    splits = []
    for k, test in enumerate(blocks):
        lo, hi = test[0] - gap, test[-1] + gap
        rest = np.array([i for i in range(n_epochs) if i < lo or i > hi], dtype=np.int64)
        # start the validation block just after the test block, wrapping around the night
        rest = np.roll(rest, -int(np.searchsorted(rest, hi + 1)))
        n_val = max(1, int(round(val_fraction * len(rest))))
        val, train = np.sort(rest[:n_val]), np.sort(rest[n_val:])
        splits.append(FoldSplit(k, "time-block", train, val, test.astype(np.int64), ("train",),
                                PROTOCOL_LABELS["time-block"], unit="epoch"))
    return splits


def class_weight_counts(labels_by_set: dict[str, np.ndarray], split: FoldSplit, n_classes: int = 5) -> np.ndarray:
    """Per-class counts of the labels the protocol takes class weights from (``split.weight_from``)."""
    labels = np.concatenate([np.asarray(labels_by_set[name]) for name in split.weight_from])
    return np.bincount(labels.astype(np.int64), minlength=n_classes)[:n_classes]
