"""Load prepared nights (``.npz`` files written by :func:`sleeplib.data.prepare.prepare`).

This module never imports MNE: training code, notebooks on a GPU box and the model tests use it
with nothing but numpy and pandas installed.

One prepared night is one ``.npz`` with keys ``x`` (float32, ``(N, T)`` or ``(N, C, T)``, microvolts),
``y`` (int64 ``(N,)``, 0..4 = W, N1, N2, N3, REM), ``fs``, ``channels``, ``record``, ``subject``,
``night``, ``dataset`` and ``synthetic`` (see ``CONTRIBUTING.md``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, overload

import numpy as np
import pandas as pd

from sleeplib import STAGES

__all__ = ["Night", "SleepNights", "load_night", "load_nights", "subject_folds"]


@dataclass
class Night:
    """One prepared night: 30-s epochs and their labels.

    Attributes
    ----------
    x : numpy.ndarray
        float32 epochs in microvolts, ``(N, T)`` for one channel or ``(N, C, T)`` for several.
    y : numpy.ndarray
        int64 labels ``(N,)``, 0..4 in the order of :data:`sleeplib.STAGES`.
    subject : int
        Subject id (Sleep-Cassette: 0..82).
    night : int
        Night number (1 or 2).
    record : str
        PhysioNet PSG stem, e.g. ``"SC4001E0"``.
    fs : float
        Sampling rate of ``x`` in Hz.
    channels : tuple of str
        Channel names, in the order of the ``C`` axis.
    dataset : str
        Dataset the night came from (``"sleep-edf-20"``, ``"sample"``, ``"synthetic"``, ...).
    synthetic : bool
        True only for generated data.
    path : pathlib.Path or None
        The ``.npz`` the night was read from.
    """

    x: np.ndarray
    y: np.ndarray
    subject: int
    night: int
    record: str
    fs: float
    channels: tuple[str, ...]
    dataset: str = ""
    synthetic: bool = False
    path: Path | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(len(self.y))

    @property
    def n_epochs(self) -> int:
        """Number of 30-s epochs."""
        return len(self)


def _scalar(value: np.ndarray) -> object:
    """Unwrap a 0-d array read from an ``.npz`` into a Python scalar."""
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value


def load_night(path: str | os.PathLike) -> Night:
    """Read one prepared ``.npz`` into a :class:`Night`.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`sleeplib.data.prepare.prepare`.

    Returns
    -------
    Night

    Raises
    ------
    ValueError
        If the file lacks one of the required keys or ``x`` and ``y`` disagree in length.
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in ("x", "y", "fs") if k not in npz.files]
        if missing:
            raise ValueError(
                f"{path} is not a prepared night: it lacks {missing} (keys present: {npz.files}); "
                "re-create it with `sleeplib prepare ...`"
            )
        x = npz["x"].astype(np.float32, copy=False)
        y = npz["y"].astype(np.int64, copy=False)
        fs = float(_scalar(npz["fs"]))
        if "channels" in npz.files:
            channels = tuple(str(c) for c in np.atleast_1d(npz["channels"]))
        elif "ch_label" in npz.files:
            channels = tuple(str(c) for c in np.atleast_1d(npz["ch_label"]))
        else:
            channels = ("unknown",)
        record = str(_scalar(npz["record"])) if "record" in npz.files else path.stem
        subject = int(_scalar(npz["subject"])) if "subject" in npz.files else -1
        night = int(_scalar(npz["night"])) if "night" in npz.files else 1
        dataset = str(_scalar(npz["dataset"])) if "dataset" in npz.files else ""
        synthetic = bool(_scalar(npz["synthetic"])) if "synthetic" in npz.files else False
    if len(x) != len(y):
        raise ValueError(
            f"{path}: x has {len(x)} epochs but y has {len(y)} labels; the file is corrupt, "
            "delete it and run `sleeplib prepare ...` again"
        )
    return Night(
        x=x, y=y, subject=subject, night=night, record=record, fs=fs, channels=channels,
        dataset=dataset, synthetic=synthetic, path=path,
    )


class SleepNights(Sequence[Night]):
    """An ordered collection of :class:`Night` objects (one per recording).

    Parameters
    ----------
    nights : iterable of Night
        The nights, kept in the given order.
    """

    def __init__(self, nights: Iterable[Night]):
        self.nights: list[Night] = list(nights)

    def __len__(self) -> int:
        return len(self.nights)

    @overload
    def __getitem__(self, index: int) -> Night: ...

    @overload
    def __getitem__(self, index: slice) -> "SleepNights": ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return SleepNights(self.nights[index])
        return self.nights[index]

    def __iter__(self) -> Iterator[Night]:
        return iter(self.nights)

    def __repr__(self) -> str:
        return (
            f"SleepNights({len(self)} nights, {self.n_epochs} epochs, "
            f"subjects={self.subjects.tolist()}, synthetic={self.synthetic})"
        )

    @property
    def subjects(self) -> np.ndarray:
        """Sorted unique subject ids (int64)."""
        return np.unique(np.array([n.subject for n in self.nights], dtype=np.int64))

    @property
    def records(self) -> list[str]:
        """Record names, in order."""
        return [n.record for n in self.nights]

    @property
    def n_epochs(self) -> int:
        """Total number of epochs over all nights."""
        return int(sum(len(n) for n in self.nights))

    @property
    def synthetic(self) -> bool:
        """True when any night is generated data."""
        return any(n.synthetic for n in self.nights)

    @property
    def fs(self) -> float:
        """The common sampling rate; raises if nights disagree."""
        rates = {n.fs for n in self.nights}
        if len(rates) != 1:
            raise ValueError(f"nights have different sampling rates {sorted(rates)}; prepare them alike")
        return rates.pop()

    @property
    def channels(self) -> tuple[str, ...]:
        """The common channel names; raises if nights disagree."""
        names = {n.channels for n in self.nights}
        if len(names) != 1:
            raise ValueError(f"nights have different channels {sorted(names)}; prepare them alike")
        return names.pop()

    def select(
        self,
        subjects: Iterable[int] | None = None,
        records: Iterable[str] | None = None,
    ) -> "SleepNights":
        """Return the nights of the given subjects and/or records (both filters apply if given).

        Parameters
        ----------
        subjects : iterable of int, optional
            Subject ids to keep; ``None`` keeps all.
        records : iterable of str, optional
            Record names to keep; ``None`` keeps all.

        Returns
        -------
        SleepNights
            A new collection (the arrays are shared, not copied).
        """
        keep_subjects = None if subjects is None else {int(s) for s in np.atleast_1d(subjects)}
        keep_records = None if records is None else {str(r) for r in np.atleast_1d(records)}
        return SleepNights(
            n for n in self.nights
            if (keep_subjects is None or n.subject in keep_subjects)
            and (keep_records is None or n.record in keep_records)
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Concatenate all nights.

        Returns
        -------
        x : numpy.ndarray
            float32 ``(sum N, T)`` or ``(sum N, C, T)``.
        y : numpy.ndarray
            int64 ``(sum N,)``.
        night_index : numpy.ndarray
            int64 ``(sum N,)``: position in this collection of the night each epoch came from
            (so sequence models can avoid windows that straddle two nights).

        Raises
        ------
        ValueError
            If the collection is empty or the nights' epoch shapes differ.
        """
        if not self.nights:
            raise ValueError("no nights to concatenate; check the subjects/records you selected")
        shapes = {n.x.shape[1:] for n in self.nights}
        if len(shapes) != 1:
            raise ValueError(
                f"nights have different epoch shapes {sorted(shapes)}; prepare them with the same "
                "channels and sampling rate"
            )
        x = np.concatenate([n.x for n in self.nights]).astype(np.float32, copy=False)
        y = np.concatenate([n.y for n in self.nights]).astype(np.int64, copy=False)
        night_index = np.concatenate(
            [np.full(len(n), i, dtype=np.int64) for i, n in enumerate(self.nights)]
        )
        return x, y, night_index

    def label_counts(self) -> pd.DataFrame:
        """Epochs per stage and night.

        Returns
        -------
        pandas.DataFrame
            One row per night (index ``record``), columns ``subject``, ``night``, one column per
            stage in :data:`sleeplib.STAGES` and ``total``; a last row ``"total"`` sums them.
        """
        rows = []
        for n in self.nights:
            counts = np.bincount(n.y, minlength=len(STAGES))[: len(STAGES)]
            rows.append({"record": n.record, "subject": n.subject, "night": n.night,
                         **dict(zip(STAGES, counts.tolist())), "total": int(len(n.y))})
        table = pd.DataFrame(rows, columns=["record", "subject", "night", *STAGES, "total"])
        table = table.set_index("record")
        if len(table):
            total = table[[*STAGES, "total"]].sum()
            table.loc["total", [*STAGES, "total"]] = total.values
            table[[*STAGES, "total"]] = table[[*STAGES, "total"]].astype("int64")
        return table


def _sort_key(night: Night) -> tuple:
    return (night.subject, night.night, night.record)


def load_nights(folder_or_paths: str | os.PathLike | Iterable[str | os.PathLike]) -> SleepNights:
    """Load prepared nights from a folder (every ``*.npz`` in it) or from a list of files.

    Parameters
    ----------
    folder_or_paths : path-like or iterable of path-like
        A folder written by :func:`sleeplib.data.prepare.prepare` (as returned by
        :func:`sleeplib.data.prepare.prepared_dir`), or the list of paths ``prepare`` returned.

    Returns
    -------
    SleepNights
        Sorted by subject, night and record.

    Raises
    ------
    FileNotFoundError
        If the folder does not exist, holds no ``.npz``, or a listed file is missing.
    """
    if isinstance(folder_or_paths, (str, os.PathLike)):
        folder = Path(folder_or_paths)
        if folder.is_file():
            paths = [folder]
        elif folder.is_dir():
            # Temporary files of interrupted atomic writes start with "."; never read them.
            paths = sorted(p for p in folder.glob("*.npz") if not p.name.startswith("."))
            if not paths:
                raise FileNotFoundError(
                    f"no prepared nights (*.npz) in {folder}; run `sleeplib prepare <dataset> ...` "
                    "(or sleeplib.data.prepare.prepare(...)) first"
                )
        else:
            raise FileNotFoundError(
                f"{folder} does not exist; run `sleeplib prepare <dataset> ...` "
                "(or sleeplib.data.prepare.prepare(...)) first"
            )
    else:
        paths = [Path(p) for p in folder_or_paths]
        if not paths:
            raise FileNotFoundError(
                "empty list of prepared nights; run `sleeplib prepare <dataset> ...` first"
            )
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"prepared nights not found: {missing}; run `sleeplib prepare <dataset> ...` first"
            )
    return SleepNights(sorted((load_night(p) for p in paths), key=_sort_key))


def subject_folds(
    subjects: Iterable[int],
    n_folds: int,
    permutation: Sequence[int] | np.ndarray | None = None,
    seed: int | None = None,
) -> list[np.ndarray]:
    """Split subjects into ``n_folds`` disjoint folds (subject-wise cross-validation).

    The unique subjects are sorted, reordered by ``permutation`` (or by a permutation drawn with
    ``seed``; neither given keeps sorted order), then cut with :func:`numpy.array_split`. A subject
    is therefore never in two folds, so both nights of one person stay on the same side.

    Parameters
    ----------
    subjects : iterable of int
        Subject ids (duplicates are ignored).
    n_folds : int
        Number of folds, ``1 <= n_folds <= number of unique subjects``.
    permutation : sequence of int, optional
        A permutation of ``range(n_subjects)`` applied to the sorted subjects (e.g. a paper's
        published fold order). Takes precedence over ``seed``.
    seed : int, optional
        Seed for a random permutation when ``permutation`` is not given.

    Returns
    -------
    list of numpy.ndarray
        ``n_folds`` int64 arrays of subject ids.

    Raises
    ------
    ValueError
        If ``n_folds`` is out of range or ``permutation`` is not a permutation of the right size.
    """
    unique = np.unique(np.asarray(list(subjects), dtype=np.int64))
    n_folds = int(n_folds)
    if not 1 <= n_folds <= len(unique):
        raise ValueError(
            f"n_folds={n_folds} must be between 1 and the number of subjects ({len(unique)}); "
            "use fewer folds or more subjects"
        )
    if permutation is not None:
        order = np.asarray(permutation, dtype=np.int64)
        if order.shape != unique.shape or not np.array_equal(np.sort(order), np.arange(len(unique))):
            raise ValueError(
                f"permutation must be a permutation of range({len(unique)}) (one entry per unique "
                f"subject); got {order.tolist()}"
            )
    elif seed is not None:
        order = np.random.default_rng(seed).permutation(len(unique))
    else:
        order = np.arange(len(unique))
    return [fold.astype(np.int64) for fold in np.array_split(unique[order], n_folds)]
