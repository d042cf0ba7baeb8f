"""Sequence batching and the class-balancing schemes of DeepSleepNet and SleepEEGNet.

Batchers (the trainer's extension point, see :mod:`sleeplib.train.batching`)
---------------------------------------------------------------------------
:class:`NightSequenceBatcher` (DeepSleepNet fine-tuning)
    ``deepsleep/utils.py::iterate_batch_seq_minibatches`` and ``DeepSleepNetTrainer._run_epoch`` of
    akaraspt/deepsleepnet: the nights are visited one after the other (sorted file order, no
    shuffling); a night of ``n`` epochs is cut into ``B`` (batch size, 10) contiguous rows of
    ``n // B`` epochs, and the rows are walked in chunks of ``L`` (25) epochs, so a batch is
    ``(B, L)`` epochs where each row continues the previous batch's row. The LSTM state is carried
    from chunk to chunk and reset to zeros at the start of every night; epochs beyond
    ``B * L * (n // B // L)`` are not trained on. Evaluation follows ``predict.py``: one row per
    night (batch 1), chunks of ``L``, state carried; here the last partial chunk is scored too
    (the original drops the last ``n % L`` epochs of each night from its figures).
:class:`Seq2SeqBatcher` (SleepEEGNet)
    ``dataloader.py::SeqDataLoader.load_data`` and ``batch_data`` of MousaviSajad/SleepEEGNet:
    training epochs of all nights concatenated and cut into non-overlapping sequences of ``L``
    (10) epochs (a sequence may straddle two nights, as in their code), shuffled every epoch,
    batches of 20 sequences, the last incomplete batch dropped. Training decodes with teacher
    forcing; evaluation decodes freely (their ``GreedyEmbeddingHelper``). Evaluation here scores
    every epoch of every night (their ``evaluate_model`` drops the incomplete last sequence and
    batch, and shuffles the test sequences): the tail of a night is scored with the last ``L``
    epochs and only the not-yet-scored positions kept.
:class:`DropLastEpochBatcher` (DeepSleepNet pre-training)
    Shuffled independent epochs without the last incomplete batch (``iterate_minibatches``).

Class balancing
---------------
:func:`balanced_oversample_indices` is DeepSleepNet's ``get_balance_class_oversample`` (every
original epoch kept, each class replicated up to the largest class count).
:func:`smote_oversample` and :func:`sleepeegnet_resample_targets` are SleepEEGNet's SMOTE step
(``imblearn.over_sampling.SMOTE(random_state=12, ratio=...)`` in ``seq2seq_sleep_sleep-EDF.py``),
written here with scikit-learn's nearest neighbours (imbalanced-learn is not a dependency).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from sleeplib.train.batching import BATCHERS, ArraySet, Batch, EpochBatcher

__all__ = [
    "night_bounds",
    "balanced_oversample_indices",
    "oversample_balanced",
    "zscore_epochs",
    "smote_oversample",
    "sleepeegnet_resample_targets",
    "sleepeegnet_training_set",
    "DropLastEpochBatcher",
    "NightSequenceBatcher",
    "Seq2SeqBatcher",
    "detach_state",
]


def night_bounds(night: torch.Tensor | np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of equal night ids, in data order."""
    night = np.asarray(night.cpu() if torch.is_tensor(night) else night)
    if len(night) == 0:
        return []
    cuts = np.flatnonzero(np.diff(night) != 0) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(night)]])
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


# --------------------------------------------------------------------------- class balancing


def balanced_oversample_indices(y, seed: int | None = 0) -> np.ndarray:
    """Indices of DeepSleepNet's class-balanced training set (``get_balance_class_oversample``).

    For each class present (in label order): every epoch repeated ``n_max // n_c`` times
    (consecutively, as ``np.repeat``), then ``n_max - n_c * (n_max // n_c)`` distinct epochs of the
    class drawn at random to top it up to ``n_max``, the count of the largest class. Every original
    epoch is therefore kept at least once.

    Parameters
    ----------
    y : array-like of int
        Labels.
    seed : int, optional
        Seeds the top-up draw (the original uses the unseeded global NumPy state).

    Returns
    -------
    numpy.ndarray
        int64 indices into ``y``; ``len == n_classes_present * n_max``.
    """
    y = np.asarray(y).astype(np.int64)
    if y.size == 0:
        raise ValueError("no labels to oversample")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    n_max = counts.max()
    out = []
    for c, n_c in zip(classes, counts):
        idx = np.flatnonzero(y == c)
        reps = np.repeat(idx, n_max // n_c)
        remain = n_max - len(reps)
        if remain > 0:
            reps = np.concatenate([reps, rng.permutation(idx)[:remain]])
        out.append(reps)
    return np.concatenate(out)


def oversample_balanced(data: ArraySet, seed: int | None = 0) -> ArraySet:
    """``data`` re-indexed by :func:`balanced_oversample_indices` (for epoch-wise pre-training)."""
    idx = torch.from_numpy(balanced_oversample_indices(data.y.numpy(), seed))
    return ArraySet(data.x[idx], data.y[idx], data.night[idx])


def zscore_epochs(x: np.ndarray | torch.Tensor, eps: float = 1e-8):
    """Standardise each epoch (and channel) to zero mean, unit variance over time.

    SleepEEGNet's ``dataloader.py`` normalises every 30-s epoch this way before training and testing
    (``(x - mean) / std`` along the samples); ``eps`` guards a flat epoch.
    """
    if torch.is_tensor(x):
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True, unbiased=False)
        return (x - mean) / (std + eps)
    x = np.asarray(x, dtype=np.float32)
    return ((x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + eps)).astype(np.float32)


def smote_oversample(x: np.ndarray, y: np.ndarray, targets: dict[int, int], k_neighbors: int = 5,
                     seed: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """SMOTE: raise each class to ``targets[class]`` epochs with interpolated synthetic epochs.

    As imbalanced-learn's ``SMOTE`` (which SleepEEGNet's code calls): the original epochs come
    first, in their order, followed by the synthetic ones grouped by class in label order. A
    synthetic epoch is ``x_i + u * (x_j - x_i)`` with ``x_i`` a random epoch of the class, ``x_j``
    one of its ``k_neighbors`` nearest neighbours within the class (Euclidean, on the raw samples)
    and ``u ~ U(0, 1)``.

    Parameters
    ----------
    x : numpy.ndarray
        ``(N, ...)`` epochs (flattened for the neighbour search).
    y : numpy.ndarray
        ``(N,)`` labels.
    targets : dict
        Desired total count per class; classes already at or above it are left as they are.
    k_neighbors : int
        5, imbalanced-learn's default (SleepEEGNet does not change it).
    seed : int
        12 in SleepEEGNet's code (``random_state=12``).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The augmented epochs and labels.
    """
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    x = np.asarray(x)
    y = np.asarray(y).astype(np.int64)
    flat = x.reshape(len(x), -1)
    new_x, new_y = [x], [y]
    for c in sorted(targets):
        idx = np.flatnonzero(y == c)
        n_new = int(targets[c]) - len(idx)
        if n_new <= 0 or len(idx) == 0:
            continue
        if len(idx) == 1:
            # no neighbour to interpolate with: copies (imbalanced-learn would refuse)
            new_x.append(np.repeat(x[idx], n_new, axis=0))
            new_y.append(np.full(n_new, c, dtype=np.int64))
            continue
        k = min(k_neighbors, len(idx) - 1)
        nn = NearestNeighbors(n_neighbors=k + 1).fit(flat[idx])
        neighbours = nn.kneighbors(flat[idx], return_distance=False)[:, 1:]  # drop the epoch itself
        pick = rng.integers(0, len(idx) * k, size=n_new)
        rows, cols = pick // k, pick % k
        step = rng.uniform(0.0, 1.0, size=(n_new,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        base = x[idx[rows]]
        other = x[idx[neighbours[rows, cols]]]
        new_x.append((base + step * (other - base)).astype(x.dtype))
        new_y.append(np.full(n_new, c, dtype=np.int64))
    return np.concatenate(new_x), np.concatenate(new_y)


def sleepeegnet_resample_targets(counts, scheme: str = "edf-2013") -> tuple[dict[int, int], dict[int, int]]:
    """SleepEEGNet's per-class (undersampling caps, SMOTE targets) for a training set.

    From ``run_program`` in ``seq2seq_sleep_sleep-EDF.py``:

    ``"edf-2013"`` (Sleep-EDF-20)
        No undersampling; every class other than N2 with fewer than ``n_N2 - 7000`` epochs is
        raised to ``n_N2 - 7000``. On small sets (``n_N2 <= 7000``, e.g. our smoke data) that
        target is not positive; we then use ``n_N2`` (full balance to N2) and say so in the notes.
    ``"edf-2018"`` (Sleep-EDF-78)
        W and N2 randomly cut to at most 35000 epochs, then every class other than N2 below 30000
        raised to 30000.
    ``"none"``
        Neither.

    Returns
    -------
    caps : dict
        Class -> maximum count (undersampling).
    targets : dict
        Class -> count after SMOTE.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if scheme == "none":
        return {}, {}
    if scheme == "edf-2013":
        level = counts[2] - 7000
        if level <= 0:
            level = counts[2]
        return {}, {c: max(int(counts[c]), int(level)) for c in range(len(counts)) if c != 2}
    if scheme == "edf-2018":
        caps = {0: 35000, 2: 35000}
        capped = counts.copy()
        for c, cap in caps.items():
            capped[c] = min(capped[c], cap)
        return caps, {c: max(int(capped[c]), 30000) for c in range(len(counts)) if c != 2}
    raise ValueError(f"scheme must be 'edf-2013', 'edf-2018' or 'none', got {scheme!r}")


def sleepeegnet_training_set(data: ArraySet, seq_length: int = 10, scheme: str = "edf-2013",
                             seed: int = 12, respect_nights: bool = False) -> tuple[ArraySet, dict]:
    """SleepEEGNet's training layout: sequences of ``seq_length`` epochs after SMOTE.

    Steps of their code: concatenate the training nights, cut into sequences of ``L`` (dropping the
    incomplete last one), flatten, undersample/SMOTE (:func:`sleepeegnet_resample_targets`), cut
    again into sequences of ``L`` (dropping the remainder). Original sequences keep their order;
    synthetic epochs form single-class sequences at the end. The result is an :class:`ArraySet`
    whose ``night`` is the sequence id, to be batched by :class:`Seq2SeqBatcher`.

    Parameters
    ----------
    data : ArraySet
        Training epochs, nights contiguous and in time order.
    seq_length : int
        10 in the paper and code (``max_time_step=10``).
    scheme : {"edf-2013", "edf-2018", "none"}
    seed : int
        Seeds the undersampling and SMOTE.
    respect_nights : bool
        Cut sequences within nights only (each night's remainder dropped) instead of across the
        concatenation, a variant; the released code cuts across nights.

    Returns
    -------
    (ArraySet, dict)
        The set and a summary (``counts_before``, ``counts_after``, ``n_sequences``, ``note``).
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    x, y = data.x.numpy(), data.y.numpy()
    if respect_nights:
        keep = np.concatenate([np.arange(a, a + (b - a) // seq_length * seq_length)
                               for a, b in night_bounds(data.night)] or [np.zeros(0, np.int64)])
    else:
        keep = np.arange(len(y) // seq_length * seq_length)
    if len(keep) == 0:
        raise ValueError(f"the training set has fewer than seq_length={seq_length} epochs")
    x, y = x[keep], y[keep]
    counts_before = np.bincount(y, minlength=5)[:5]
    caps, targets = sleepeegnet_resample_targets(counts_before, scheme)
    note = ""
    if scheme == "edf-2013" and counts_before[2] - 7000 <= 0:
        note = (f"N2 has only {counts_before[2]} epochs (<= 7000): SMOTE raises the other classes to "
                f"the N2 count instead of N2 - 7000")
    rng = np.random.default_rng(seed)
    if caps:
        drop = []
        for c, cap in caps.items():
            idx = np.flatnonzero(y == c)
            if len(idx) > cap:
                drop.append(idx[rng.permutation(len(idx))[: len(idx) - cap]])
        if drop:
            mask = np.ones(len(y), bool)
            mask[np.concatenate(drop)] = False
            x, y = x[mask], y[mask]
    if targets:
        x, y = smote_oversample(x, y, targets, seed=seed)
    n_seq = len(y) // seq_length
    x, y = x[: n_seq * seq_length], y[: n_seq * seq_length]
    night = np.repeat(np.arange(n_seq), seq_length)
    summary = {
        "counts_before": counts_before.tolist(),
        "counts_after": np.bincount(y, minlength=5)[:5].tolist(),
        "n_sequences": int(n_seq),
        "scheme": scheme,
        "note": note,
    }
    return ArraySet.from_arrays(x, y, night), summary


# --------------------------------------------------------------------------- batchers


def detach_state(state: Any) -> Any:
    """Detach every tensor of a (nested tuple) recurrent state: truncated back-propagation."""
    if state is None:
        return None
    if torch.is_tensor(state):
        return state.detach()
    return type(state)(detach_state(s) for s in state)


class DropLastEpochBatcher(EpochBatcher):
    """Shuffled epochs, last incomplete batch dropped (DeepSleepNet's ``iterate_minibatches``).

    A set smaller than one batch still gives one (smaller) batch, so tiny test sets train.
    """

    name = "epoch_drop_last"

    def train_batches(self, data: ArraySet, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        order = torch.randperm(len(data), generator=generator)
        n_full = len(order) // batch_size
        if n_full == 0:
            yield Batch(data.x[order], data.y[order])
            return
        for b in range(n_full):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield Batch(data.x[idx], data.y[idx])

    def n_train_batches(self, data: ArraySet, batch_size: int) -> int:
        return max(1, len(data) // batch_size)


class NightSequenceBatcher:
    """DeepSleepNet's fine-tuning batches: ``B`` contiguous rows of a night, chunks of ``L`` epochs,
    LSTM state carried along the night and reset between nights (module docstring).

    The trainer's ``batch_size`` is the number of rows ``B`` (10 in the original).

    Parameters
    ----------
    seq_length : int
        ``L``, epochs per chunk (25).
    shuffle_nights : bool
        Visit the training nights in a random order each epoch (drawn from the trainer's
        generator). False: data order, as the original (sorted files).
    """

    name = "night_sequence"

    def __init__(self, seq_length: int = 25, shuffle_nights: bool = False):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.seq_length = seq_length
        self.shuffle_nights = shuffle_nights

    def night_layout(self, n_epochs: int, batch_size: int) -> tuple[int, int]:
        """``(row_length, n_chunks)`` of a night of ``n_epochs`` (``n // B``, ``(n // B) // L``)."""
        row_length = n_epochs // batch_size
        return row_length, row_length // self.seq_length

    def train_batches(self, data: ArraySet, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        bounds = night_bounds(data.night)
        if self.shuffle_nights:
            bounds = [bounds[i] for i in torch.randperm(len(bounds), generator=generator).tolist()]
        if not any(self.night_layout(b - a, batch_size)[1] for a, b in bounds):
            raise ValueError(
                f"no night has batch_size * seq_length = {batch_size} * {self.seq_length} epochs; "
                "lower batch_size or seq_length"
            )
        L = self.seq_length
        for start, stop in bounds:
            row_length, n_chunks = self.night_layout(stop - start, batch_size)
            if n_chunks == 0:
                continue  # the original raises here; a short night is skipped instead
            rows = start + torch.arange(batch_size)[:, None] * row_length  # (B, 1)
            for chunk in range(n_chunks):
                idx = rows + chunk * L + torch.arange(L)[None, :]  # (B, L)
                yield Batch(data.x[idx], data.y[idx], reset=chunk == 0)

    def n_train_batches(self, data: ArraySet, batch_size: int) -> int:
        return sum(self.night_layout(b - a, batch_size)[1] for a, b in night_bounds(data.night))

    def eval_batches(self, data: ArraySet, batch_size: int) -> Iterator[Batch]:
        # predict.py: batch of one row per night, chunks of L, state carried; the last partial
        # chunk is scored too so that every epoch gets a prediction.
        L = self.seq_length
        for start, stop in night_bounds(data.night):
            for first in range(start, stop, L):
                last = min(first + L, stop)
                yield Batch(data.x[first:last].unsqueeze(0), data.y[first:last].unsqueeze(0), reset=first == start)

    def forward(self, model: torch.nn.Module, batch: Batch, state: Any = None):
        if batch.reset:
            state = None  # a new night starts from the zero state
        logits, new_state = model(batch.x, state)
        return logits.reshape(-1, logits.shape[-1]), batch.y.reshape(-1), detach_state(new_state)


class Seq2SeqBatcher:
    """SleepEEGNet's batches: shuffled sequences of ``L`` consecutive epochs (module docstring).

    Training data are expected in :func:`sleepeegnet_training_set`'s layout (consecutive groups of
    ``L`` epochs are the sequences); evaluation data are ordinary nights.

    Parameters
    ----------
    seq_length : int
        ``L`` (10).
    teacher_forcing : bool
        Decode the training batches with the true previous stage (True, as their
        ``TrainingHelper``) or with the model's own previous prediction (False, free running).
        Evaluation always decodes freely.
    """

    name = "seq2seq"

    def __init__(self, seq_length: int = 10, teacher_forcing: bool = True):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.seq_length = seq_length
        self.teacher_forcing = teacher_forcing

    def train_batches(self, data: ArraySet, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        L = self.seq_length
        n_seq = len(data) // L
        if n_seq == 0:
            raise ValueError(f"the training set has fewer than seq_length={L} epochs")
        order = torch.randperm(n_seq, generator=generator)
        n_full = n_seq // batch_size
        groups = [order[b * batch_size : (b + 1) * batch_size] for b in range(n_full)] or [order]
        for seqs in groups:
            idx = seqs[:, None] * L + torch.arange(L)[None, :]
            yield Batch(data.x[idx], data.y[idx])

    def n_train_batches(self, data: ArraySet, batch_size: int) -> int:
        return max(1, (len(data) // self.seq_length) // batch_size)

    def eval_windows(self, data: ArraySet) -> list[tuple[int, int, int]]:
        """``(start, stop, n_keep)`` windows covering every night; only the last ``n_keep`` count."""
        L = self.seq_length
        windows = []
        for start, stop in night_bounds(data.night):
            if stop - start <= L:
                windows.append((start, stop, stop - start))
                continue
            for first in range(start, stop - L + 1, L):
                windows.append((first, first + L, L))
            tail = (stop - start) % L
            if tail:
                windows.append((stop - L, stop, tail))  # re-use earlier epochs as context
        return windows

    def eval_batches(self, data: ArraySet, batch_size: int) -> Iterator[Batch]:
        pending: list[tuple[int, int, int]] = []

        def flush(items):
            x = torch.stack([data.x[a:b] for a, b, _ in items])
            y = torch.stack([data.y[a:b] for a, b, _ in items]).clone()
            for row, (a, b, keep) in enumerate(items):
                y[row, : (b - a) - keep] = -1  # already scored by the previous window
            return Batch(x, y, reset=True)

        for window in self.eval_windows(data):
            if pending and (window[1] - window[0] != pending[0][1] - pending[0][0] or len(pending) == batch_size):
                yield flush(pending)
                pending = []
            pending.append(window)
        if pending:
            yield flush(pending)

    def forward(self, model: torch.nn.Module, batch: Batch, state: Any = None):
        if model.training and self.teacher_forcing:
            logits = model(batch.x, targets=batch.y, teacher_forcing=True)
        else:
            logits = model(batch.x, targets=None, teacher_forcing=False)
        logits = logits.reshape(-1, logits.shape[-1])
        y = batch.y.reshape(-1)
        keep = y >= 0
        if not bool(keep.all()):
            logits, y = logits[keep], y[keep]
        return logits, y, None


BATCHERS.setdefault("epoch_drop_last", DropLastEpochBatcher)
BATCHERS.setdefault("night_sequence", NightSequenceBatcher)
BATCHERS.setdefault("seq2seq", Seq2SeqBatcher)
