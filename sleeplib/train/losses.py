"""Losses of the sequence models: plain/weighted cross-entropy, DeepSleepNet's summed sequence
cross-entropy, and SleepEEGNet's class-balanced MFE and MSFE.

Every loss has the trainer's signature ``loss(logits (n, K), target (n,), class_weight) -> scalar``
(see :data:`sleeplib.train.trainer.LOSSES`); a sequence batcher hands over the ``(B, L)`` epochs of
a batch flattened row by row, so a loss that needs the sequences back takes ``seq_length``
(:func:`get_seq_loss` builds such closures by name).

MFE and MSFE (Mousavi et al. 2019, after Wang et al. 2016)
---------------------------------------------------------
With ``L_n`` the per-epoch error (cross-entropy here) and ``C_i`` the epochs of class ``i`` in a
group of epochs, the class error is ``l_i = (1 / C_i) * sum_{n in class i} L_n`` and

* MFE  = ``sum_i l_i``    (each stage's *mean* error counts once, whatever its frequency),
* MSFE = ``sum_i l_i ** 2`` (additionally favours the class with the larger error).

Classes absent from the group contribute nothing. Where the group is taken:

``"batch"``
    All epochs of the minibatch pooled (the paper's formula read literally).
``"sequence"``
    One group per sequence, then the mean over the sequences of the batch. This is what the
    released code computes (``seq2seq_sleep_sleep-EDF.py``, ``build_whole_model``: one
    ``tf.contrib.seq2seq.sequence_loss`` per class with 0/1 class weights and
    ``average_across_batch=False``, summed over classes, then ``reduce_mean`` over the batch). The
    code's targets also contain the ``<EOD>`` token, whose single position adds one more "class"
    term; our decoder has no end token, so that term is absent (see the notebook's notes).

Wang S, Liu W, Wu J, Cao L, Meng Q, Kennedy PJ. Training deep neural networks on imbalanced data
sets. IJCNN 2016. Wang et al. use the squared error for ``L_n``; SleepEEGNet's code uses the
cross-entropy, which is the default here (``per_epoch="ce"``), ``per_epoch="mse"`` gives theirs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "cross_entropy",
    "weighted_cross_entropy",
    "summed_sequence_ce",
    "class_mean_errors",
    "mfe_loss",
    "msfe_loss",
    "SEQ_LOSSES",
    "get_seq_loss",
]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy, unweighted (``class_weight`` is ignored on purpose).

    DeepSleepNet pre-trains with it on a class-balanced (oversampled) set, so it needs no weights.
    """
    return F.cross_entropy(logits.float(), target)


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted cross-entropy normalised by the summed weights (torch's ``weight=`` convention)."""
    return F.cross_entropy(logits.float(), target, weight=class_weight)


def summed_sequence_ce(seq_length: int) -> Callable:
    """DeepSleepNet's fine-tuning loss: cross-entropy summed over the ``L`` epochs of a sequence,
    averaged over the sequences of the batch.

    ``deepsleep/model.py`` (``DeepSleepNet.init_ops``) computes ``sum(CE) / batch_size`` over the
    ``batch_size * seq_length`` epochs, i.e. ``seq_length`` times the mean cross-entropy. The factor
    matters because the L2 term on the first convolution is added to this sum unscaled: keeping it
    keeps the original balance between the two (Adam is otherwise insensitive to the scale).

    Parameters
    ----------
    seq_length : int
        Epochs per sequence (25 in the original).
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")

    def loss(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target) * seq_length

    loss.__name__ = f"summed_sequence_ce_L{seq_length}"
    return loss


def _per_epoch_error(logits: torch.Tensor, target: torch.Tensor, per_epoch: str) -> torch.Tensor:
    if per_epoch == "ce":
        return F.cross_entropy(logits.float(), target, reduction="none")
    if per_epoch == "mse":
        # Wang et al. 2016: half the squared error between the softmax output and the one-hot target.
        probs = torch.softmax(logits.float(), dim=-1)
        onehot = F.one_hot(target, probs.shape[-1]).float()
        return 0.5 * ((probs - onehot) ** 2).sum(-1)
    raise ValueError(f"per_epoch must be 'ce' or 'mse', got {per_epoch!r}")


def class_mean_errors(errors: torch.Tensor, target: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean error of each class over the last axis.

    Parameters
    ----------
    errors : torch.Tensor
        ``(G, n)`` per-epoch errors, one row per group.
    target : torch.Tensor
        ``(G, n)`` labels.
    n_classes : int

    Returns
    -------
    means : torch.Tensor
        ``(G, n_classes)`` class mean errors (0 where the class is absent).
    present : torch.Tensor
        ``(G, n_classes)`` bool, whether the class occurs in the group.
    """
    onehot = F.one_hot(target, n_classes).to(errors.dtype)  # (G, n, K)
    sums = torch.einsum("gn,gnk->gk", errors, onehot)
    counts = onehot.sum(1)
    present = counts > 0
    return sums / counts.clamp_min(1.0), present


def _false_error(logits, target, *, power: int, group: str, seq_length: int | None, per_epoch: str):
    n_classes = logits.shape[-1]
    errors = _per_epoch_error(logits, target, per_epoch)
    if group == "sequence" and seq_length is not None and errors.numel() % seq_length == 0:
        errors, target = errors.reshape(-1, seq_length), target.reshape(-1, seq_length)
    else:
        # "batch", or a set whose length is not a whole number of sequences (the trainer's
        # validation loss on a whole night set): pool every epoch in one group.
        errors, target = errors.reshape(1, -1), target.reshape(1, -1)
    means, _ = class_mean_errors(errors, target, n_classes)
    return (means**power).sum(1).mean()


def mfe_loss(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None, *,
             group: str = "batch", seq_length: int | None = None, per_epoch: str = "ce") -> torch.Tensor:
    """Mean false error: sum over classes of the class-mean per-epoch error (module docstring).

    Parameters
    ----------
    logits : torch.Tensor
        ``(n, K)``.
    target : torch.Tensor
        ``(n,)`` labels.
    class_weight : ignored
        MFE balances the classes itself.
    group : {"batch", "sequence"}
        Where class means are taken; "sequence" needs ``seq_length`` and is the released code's.
    seq_length : int, optional
    per_epoch : {"ce", "mse"}
    """
    return _false_error(logits, target, power=1, group=group, seq_length=seq_length, per_epoch=per_epoch)


def msfe_loss(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None, *,
              group: str = "batch", seq_length: int | None = None, per_epoch: str = "ce") -> torch.Tensor:
    """Mean squared false error: sum over classes of the squared class-mean error (see :func:`mfe_loss`)."""
    return _false_error(logits, target, power=2, group=group, seq_length=seq_length, per_epoch=per_epoch)


SEQ_LOSSES = ("ce", "weighted_ce", "summed_ce", "mfe", "msfe", "mfe_batch", "msfe_batch")
"""Names accepted by :func:`get_seq_loss`."""


def get_seq_loss(name: str, seq_length: int | None = None, per_epoch: str = "ce") -> Callable:
    """A loss with the trainer's signature, by name.

    Parameters
    ----------
    name : str
        ``"ce"`` (unweighted), ``"weighted_ce"``, ``"summed_ce"`` (DeepSleepNet fine-tuning),
        ``"mfe"`` / ``"msfe"`` (per sequence, as SleepEEGNet's code), ``"mfe_batch"`` /
        ``"msfe_batch"`` (pooled over the batch, the paper's formula read literally).
    seq_length : int, optional
        Needed by ``summed_ce``, ``mfe`` and ``msfe``.
    per_epoch : {"ce", "mse"}
        Per-epoch error inside MFE/MSFE.

    Raises
    ------
    KeyError
        For an unknown name (the message lists the known ones).
    ValueError
        When ``seq_length`` is needed and missing.
    """
    if name not in SEQ_LOSSES:
        raise KeyError(f"unknown loss {name!r}; known: {list(SEQ_LOSSES)}")
    if name == "ce":
        return cross_entropy
    if name == "weighted_ce":
        return weighted_cross_entropy
    if name in ("summed_ce", "mfe", "msfe") and seq_length is None:
        raise ValueError(f"loss {name!r} needs seq_length (epochs per sequence)")
    if name == "summed_ce":
        return summed_sequence_ce(seq_length)
    base = mfe_loss if name.startswith("mfe") else msfe_loss
    group = "batch" if name.endswith("_batch") else "sequence"

    def loss(logits, target, class_weight=None):
        return base(logits, target, group=group, seq_length=seq_length, per_epoch=per_epoch)

    loss.__name__ = f"{name}_L{seq_length}" if seq_length else name
    return loss
