"""Batching strategies: how a training set becomes batches, and how a model consumes them.

The trainer never indexes data itself; it asks a *batcher*. That is the extension point for the
sequence models (DeepSleepNet, SleepEEGNet): they need batches of consecutive epochs of one night,
with the recurrent state carried from one batch to the next along a night and reset between nights.

A batcher implements three methods (see :class:`EpochBatcher`, the reference implementation):

``train_batches(data, batch_size, generator)``
    Yields :class:`Batch` objects covering one training epoch, shuffled with ``generator`` (a
    ``torch.Generator`` whose state the trainer checkpoints, so a resumed run draws the same order).
``eval_batches(data, batch_size)``
    Yields batches in data order whose targets, concatenated, are exactly ``data.y`` (so
    predictions line up with epochs and nights).
``forward(model, batch, state)``
    Runs the model on one batch and returns ``(logits (n, n_classes), targets (n,), new_state)``.
    For epoch models the state is always None. A sequence batcher reshapes ``(B, L, C, T)`` ->
    logits ``(B*L, K)``, passes the hidden state in, resets it when ``batch.reset`` is True and
    detaches it afterwards (truncated back-propagation through time).

Register a new batcher in :data:`BATCHERS` so a :class:`~sleeplib.train.config.TrainConfig` can name
it (``batcher="sequence"``), or pass the object to the trainer directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

__all__ = ["ArraySet", "Batch", "EpochBatcher", "BATCHERS", "get_batcher"]


@dataclass
class ArraySet:
    """Epochs of one split as tensors: ``x (N, C, T)`` float32, ``y (N,)`` int64, ``night (N,)``.

    ``night`` numbers the night each epoch came from; epochs of one night are contiguous and in time
    order (what a sequence batcher relies on).
    """

    x: torch.Tensor
    y: torch.Tensor
    night: torch.Tensor

    @classmethod
    def from_arrays(cls, x, y, night=None) -> "ArraySet":
        """Build from numpy arrays or tensors; ``x`` ``(N, T)`` gets a channel axis.

        Raises
        ------
        ValueError
            If shapes disagree or labels are not integers in 0..4.
        """
        x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not torch.is_tensor(x) else x, dtype=torch.float32)
        y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y).long()
        if x.ndim == 2:
            x = x.unsqueeze(1)
        if x.ndim != 3:
            raise ValueError(f"x must be (N, T) or (N, C, T), got shape {tuple(x.shape)}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"y must be (N,) with N = {len(x)} epochs, got shape {tuple(y.shape)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) > 4):
            raise ValueError(f"labels must be 0..4 (W, N1, N2, N3, REM), got range {int(y.min())}..{int(y.max())}")
        if night is None:
            night = torch.zeros(len(y), dtype=torch.long)
        night = torch.as_tensor(np.asarray(night) if not torch.is_tensor(night) else night).long()
        if night.shape != y.shape:
            raise ValueError(f"night must be (N,) like y, got {tuple(night.shape)}")
        return cls(x, y, night)

    @classmethod
    def from_nights(cls, nights) -> "ArraySet":
        """Concatenate objects with ``.x`` and ``.y`` (e.g. :class:`sleeplib.data.dataset.Night`)."""
        nights = list(nights)
        if not nights:
            raise ValueError("no nights given; check the subjects selected for this split")
        x = np.concatenate([np.asarray(n.x, dtype=np.float32) for n in nights])
        y = np.concatenate([np.asarray(n.y) for n in nights])
        night = np.concatenate([np.full(len(n.y), i) for i, n in enumerate(nights)])
        return cls.from_arrays(x, y, night)

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "ArraySet":
        return ArraySet(self.x.to(device), self.y.to(device), self.night.to(device))


class Batch(NamedTuple):
    """One batch. ``reset``: a sequence model must start from a fresh recurrent state."""

    x: torch.Tensor
    y: torch.Tensor
    reset: bool = True


class EpochBatcher:
    """Independent 30-s epochs, shuffled, ``drop_last=False`` (AttnSleep's DataLoader).

    The shuffle is a ``torch.randperm`` drawn from the trainer's generator on the CPU, so the order
    is the same on every device and after a resume.
    """

    name = "epoch"

    def train_batches(self, data: ArraySet, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield Batch(data.x[idx], data.y[idx])

    def n_train_batches(self, data: ArraySet, batch_size: int) -> int:
        return -(-len(data) // batch_size)

    def eval_batches(self, data: ArraySet, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(data), batch_size):
            yield Batch(data.x[start : start + batch_size], data.y[start : start + batch_size])

    def forward(self, model: torch.nn.Module, batch: Batch, state: Any = None):
        return model(batch.x), batch.y, None


BATCHERS: dict[str, Callable[[], Any]] = {"epoch": EpochBatcher}
"""Batcher factories by name; a sequence batcher registers itself here."""


def get_batcher(name_or_batcher) -> Any:
    """Resolve a batcher name from :data:`BATCHERS`, or return a batcher object unchanged."""
    if not isinstance(name_or_batcher, str):
        return name_or_batcher
    if name_or_batcher not in BATCHERS:
        raise KeyError(f"unknown batcher {name_or_batcher!r}; known: {sorted(BATCHERS)}")
    return BATCHERS[name_or_batcher]()
