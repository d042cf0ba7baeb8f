"""Fold protocols: AttnSleep's published split, the clean split, time blocks, class weights."""

import numpy as np
import pytest

from sleeplib.train.config import attnsleep_class_weights
from sleeplib.train.protocols import PAPER_PERMUTATIONS, make_splits, paper_folds, time_block_splits


def test_paper_edf20_fold_k_tests_subject_perm_k():
    folds = paper_folds(range(20), "sleep-edf-20")
    assert len(folds) == 20
    assert [int(f[0]) for f in folds] == PAPER_PERMUTATIONS["sleep-edf-20"]


def test_paper_edf78_maps_permutation_onto_available_subjects():
    missing = {39, 68, 69, 78, 79}
    subjects = [s for s in range(83) if s not in missing]
    assert len(subjects) == 78
    folds = paper_folds(subjects, "sleep-edf-78")
    assert len(folds) == 10
    perm = PAPER_PERMUTATIONS["sleep-edf-78"]
    assert folds[0].tolist() == [subjects[i] for i in perm[:8]]
    assert sorted(np.concatenate(folds).tolist()) == subjects


def test_paper_permutation_needs_all_subjects():
    with pytest.raises(ValueError, match="permutation has 20 entries"):
        paper_folds(range(5), "sleep-edf-20")


def test_paper_selects_on_test_clean_on_held_out_training_subjects():
    paper = make_splits(range(20), "paper", dataset="sleep-edf-20")
    assert all(np.array_equal(s.val, s.test) for s in paper)
    assert paper[0].weight_from == ("train", "test") and "optimistic" in paper[0].label
    clean = make_splits(range(20), "clean", dataset="sleep-edf-20", val_fraction=0.1, seed=1)
    for p, c in zip(paper, clean):
        assert np.array_equal(p.test, c.test)
        assert len(c.val) == 2 and not set(c.val) & set(c.train) and not set(c.val) & set(c.test)
        assert sorted(np.concatenate([c.train, c.val, c.test]).tolist()) == list(range(20))
        assert c.weight_from == ("train",)


def test_time_block_splits_are_contiguous_and_disjoint():
    splits = time_block_splits(100, n_folds=4, val_fraction=0.1)
    for s in splits:
        assert np.all(np.diff(s.test) == 1)
        assert not set(s.test) & set(s.train) and not set(s.val) & set(s.train)
        assert "NOT comparable" in s.label
    assert sorted(np.concatenate([s.test for s in splits]).tolist()) == list(range(100))


def test_attnsleep_class_weights_formula():
    counts = np.array([8285, 2804, 17799, 5703, 7717])
    mu = np.array([1.5, 2, 1.5, 1, 1.5]) / 5
    expected = np.round(mu * np.maximum(1, np.log(mu * counts.sum() / counts)), 2)
    assert attnsleep_class_weights(counts) == expected.tolist()
    # N1 is rare: its weight is above mu_N1, W's log term is below 1 so it stays mu_W
    assert attnsleep_class_weights(counts)[0] == 0.3
    with pytest.raises(ValueError, match="at least one epoch"):
        attnsleep_class_weights([1, 0, 1, 1, 1])
