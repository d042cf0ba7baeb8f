"""Training recipes of the sequence models DeepSleepNet and SleepEEGNet, on the shared engine.

Everything trains through :func:`sleeplib.train.trainer.fit` with the batchers of
:mod:`sleeplib.train.sequence` and the losses of :mod:`sleeplib.train.losses`.

DeepSleepNet (Supratak et al. 2017; akaraspt/deepsleepnet ``train.py``, ``deepsleep/trainer.py``,
``deepsleep/model.py``, ``deepsleep/optimize.py``)
    1. Pre-train :class:`~sleeplib.models.deepsleepnet.DeepFeatureNet` on the class-balanced
       (oversampled) training epochs: Adam lr 1e-4 (betas 0.9/0.999, eps 1e-8), batch 100, 100
       epochs, cross-entropy, last incomplete batch dropped.
    2. Fine-tune :class:`~sleeplib.models.deepsleepnet.DeepSleepNet` (CNN copied from step 1) on
       the original nights: batch 10 rows x 25 epochs, state carried along each night, 200
       epochs, Adam lr 1e-6 for the pre-trained CNN and 1e-4 for the rest, gradient clipped to a
       global norm of 10 (``adam_clipping_list_lr(..., clip_value=10.0)``), loss = summed
       cross-entropy / batch size.
    Both steps add ``1e-3 * ||w||^2 / 2`` on the first convolution of the small-filter CNN only
    (``wd=1e-3`` in ``build_model``; the large-filter CNN's first layer has ``wd=0`` in the code),
    which is ``weight_decay=1e-3`` on that tensor in torch's (coupled) Adam. The last epoch's model
    is reported; the test subject is only printed during training, never used to select.
    Split: fold ``k`` tests subject ``k`` (file pattern ``SC4{k:02d}[1-2]E0``), 20 folds on
    Sleep-EDF-20. That protocol does not leak, so ``protocol="paper"`` and ``"clean"`` are the same
    run here (both labelled so).
SleepEEGNet (Mousavi et al. 2019; MousaviSajad/SleepEEGNet ``seq2seq_sleep_sleep-EDF.py``,
``dataloader.py``)
    Per-epoch z-scoring; sequences of 10; SMOTE (see
    :func:`~sleeplib.train.sequence.sleepeegnet_training_set`); RMSProp lr 1e-3; batch 20;
    120 epochs; MFE loss per sequence + ``1e-3 * ||w||^2 / 2`` on every non-bias variable; test
    fold evaluated every 5 epochs and the checkpoint with the best macro-F1 on it kept.
    Split as published: the night files are permuted and ``array_split`` into 20 folds, so the two
    nights of one subject can be on both sides (night-level split), and the checkpoint is chosen
    on the test fold. ``protocol="paper"`` runs exactly that (labelled optimistic);
    ``protocol="clean"`` uses subject-wise folds and selects on validation subjects drawn from
    the training subjects. The paper text (not only the code) describing RMSProp, 120 epochs and
    batch 20 could not be re-read from here; the numbers above are the released code's.

TF-to-torch differences (documented, not corrected): TF's Adam puts ``eps`` on the un-corrected
second moment and TF's RMSProp starts its mean square at 1 with ``eps=1e-10`` inside the square
root; torch's start at 0 and add ``eps`` outside. The RMSProp decay (0.9) and zero momentum are
TF's defaults.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sleeplib.io import atomic_path
from sleeplib.train import trainer as _trainer
from sleeplib.train.batching import ArraySet
from sleeplib.train.config import RECIPES, TrainConfig
from sleeplib.train.losses import cross_entropy, get_seq_loss
from sleeplib.train.protocols import PROTOCOL_LABELS as _ENGINE_PROTOCOL_LABELS
from sleeplib.train.protocols import time_block_splits
from sleeplib.train.sequence import (
    DropLastEpochBatcher,
    NightSequenceBatcher,
    Seq2SeqBatcher,
    oversample_balanced,
    sleepeegnet_training_set,
    zscore_epochs,
)

__all__ = [
    "SeqTrainConfig",
    "DEEPSLEEPNET_PRETRAIN",
    "DEEPSLEEPNET_FINETUNE",
    "SLEEPEEGNET",
    "SEQ_PROTOCOL_LABELS",
    "SeqFold",
    "seq_splits",
    "night_level_folds",
    "train_deepsleepnet",
    "train_sleepeegnet",
    "run_seq_cv",
    "cv_summary",
    "load_seq_predictions",
    "run_ablation",
    "default_ablation",
    "count_parameters",
]

FIRST_CONV = "small_filter_cnn.0.0.weight"
"""Name suffix of the one tensor DeepSleepNet L2-penalises (first conv of the small-filter CNN)."""


@dataclass
class SeqTrainConfig(TrainConfig):
    """:class:`~sleeplib.train.config.TrainConfig` plus the sequence models' own settings.

    Parameters
    ----------
    seq_length : int
        Epochs per sequence (DeepSleepNet 25, SleepEEGNet 10).
    teacher_forcing : bool
        SleepEEGNet: decode training batches with the true previous stage.
    oversample : str
        SleepEEGNet SMOTE scheme (``"edf-2013"``, ``"edf-2018"``, ``"none"``); DeepSleepNet
        pre-training: ``"balanced"`` or ``"none"``.
    select_every : int
        SleepEEGNet: evaluate the selection set every this many epochs (``test_step=5``).
    """

    seq_length: int = 25
    teacher_forcing: bool = True
    oversample: str = "none"
    select_every: int = 5

    def validate(self) -> None:
        super().validate()
        if self.seq_length < 1:
            raise ValueError(f"SeqTrainConfig: seq_length must be >= 1, got {self.seq_length}")
        if self.select_every < 1:
            raise ValueError(f"SeqTrainConfig: select_every must be >= 1, got {self.select_every}")


# ------------------------------------------------------------------------------------------- recipes

DEEPSLEEPNET_PRETRAIN = SeqTrainConfig(
    epochs=100, batch_size=100, eval_batch_size=500, optimizer="adam", lr=1e-4, weight_decay=0.0,
    betas=(0.9, 0.999), eps=1e-8, amsgrad=False,
    param_groups=[{"match": FIRST_CONV, "weight_decay": 1e-3}],
    lr_schedule="none", class_weights="none", loss="ce", batcher="epoch_drop_last", grad_clip=None,
    weight_init="model", oversample="balanced", seq_length=1, progress=False,
)
"""DeepSleepNet step 1 (``train.py::pretrain``, ``DeepFeatureNetTrainer.train``)."""

DEEPSLEEPNET_FINETUNE = SeqTrainConfig(
    epochs=200, batch_size=10, eval_batch_size=1, optimizer="adam", lr=1e-4, weight_decay=0.0,
    betas=(0.9, 0.999), eps=1e-8, amsgrad=False,
    param_groups=[{"match": FIRST_CONV, "lr": 1e-6, "weight_decay": 1e-3},
                  {"match": "feature_encoder.", "lr": 1e-6, "weight_decay": 0.0}],
    lr_schedule="none", class_weights="none", loss="summed_ce", batcher="night_sequence", grad_clip=10.0,
    weight_init="model", seq_length=25, progress=False,
)
"""DeepSleepNet step 2 (``train.py::finetune``, ``DeepSleepNetTrainer.finetune``)."""

SLEEPEEGNET = SeqTrainConfig(
    epochs=120, batch_size=20, eval_batch_size=64, optimizer="rmsprop", lr=1e-3, weight_decay=1e-3,
    amsgrad=False, param_groups=[{"match": "bias", "weight_decay": 0.0}],
    lr_schedule="none", class_weights="none", loss="mfe", batcher="seq2seq", grad_clip=None,
    monitor="macro_f1", weight_init="model", seq_length=10, teacher_forcing=True,
    oversample="edf-2013", select_every=5, progress=False,
)
"""SleepEEGNet (``seq2seq_sleep_sleep-EDF.py``: ``hparams``, ``build_whole_model``, ``run_program``)."""

for _name, _cfg in (("deepsleepnet_pretrain", DEEPSLEEPNET_PRETRAIN), ("deepsleepnet_finetune", DEEPSLEEPNET_FINETUNE),
                    ("sleepeegnet", SLEEPEEGNET)):
    RECIPES.setdefault(_name, _cfg)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def _check_first_conv(model: torch.nn.Module) -> None:
    if not any(name.endswith(FIRST_CONV) for name, _ in model.named_parameters()):
        raise RuntimeError(f"no parameter named *{FIRST_CONV} in {type(model).__name__}; the L2 group of the "
                           "DeepSleepNet recipe would be empty (was the model's layout renamed?)")


# ------------------------------------------------------------------------------------------- training


def _run_dir(out_dir, name: str, stack: contextlib.ExitStack) -> Path:
    if out_dir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"sleeplib_{name}_")))
    path = Path(out_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def train_deepsleepnet(train: ArraySet, *, sfreq: float = 100.0, pretrain: SeqTrainConfig | None = None,
                       finetune: SeqTrainConfig | None = None, model_kw: dict | None = None,
                       device: str = "cpu", out_dir=None, resume: bool = True) -> dict[str, Any]:
    """DeepSleepNet's two-step training on one training set (module docstring).

    Parameters
    ----------
    train : ArraySet
        Training nights (contiguous, in time order).
    sfreq : float
        Sampling rate (sets the CNN filter sizes).
    pretrain, finetune : SeqTrainConfig, optional
        Default :data:`DEEPSLEEPNET_PRETRAIN` / :data:`DEEPSLEEPNET_FINETUNE`; use ``.replace()``
        for tiny runs.
    model_kw : dict, optional
        Extra :class:`~sleeplib.models.deepsleepnet.DeepSleepNet` arguments (``lstm_hidden``...).
    out_dir : path, optional
        Run folder (checkpoints of both steps, resumable); None: a temporary folder.

    Returns
    -------
    dict
        ``model`` (fine-tuned, last epoch), ``feature_net``, ``pretrain_history``,
        ``finetune_history`` (DataFrames), ``n_pretrain_epochs`` (size of the oversampled set).
    """
    from sleeplib.models.deepsleepnet import DeepFeatureNet, DeepSleepNet

    pretrain = pretrain or DEEPSLEEPNET_PRETRAIN
    finetune = finetune or DEEPSLEEPNET_FINETUNE
    model_kw = dict(model_kw or {})
    n_chans, n_times = int(train.x.shape[1]), int(train.x.shape[2])
    # no run folder given: nothing to resume, so no checkpoints are written at all
    sub = lambda root, name: None if root is None else Path(root) / name  # noqa: E731
    torch.manual_seed(pretrain.seed)
    feature_net = DeepFeatureNet(n_chans=n_chans, sfreq=sfreq, n_times=n_times,
                                 **{k: v for k, v in model_kw.items() if k == "dropout"})
    _check_first_conv(feature_net)
    balanced = oversample_balanced(train, seed=pretrain.seed) if pretrain.oversample == "balanced" else train
    step1 = _trainer.fit(feature_net, balanced, None, config=pretrain, loss_fn=cross_entropy,
                         batcher=DropLastEpochBatcher(), out_dir=sub(out_dir, "pretrain"),
                         device=device, resume=resume, desc="pretrain")
    torch.manual_seed(finetune.seed)
    seq_kw = {k: v for k, v in model_kw.items() if k != "dropout"}
    model = DeepSleepNet.from_feature_net(feature_net.cpu(), **seq_kw)
    _check_first_conv(model)
    step2 = _trainer.fit(model, train, None, config=finetune, loss_fn=get_seq_loss("summed_ce", finetune.seq_length),
                         batcher=NightSequenceBatcher(finetune.seq_length), out_dir=sub(out_dir, "finetune"),
                         device=device, resume=resume, desc="finetune")
    return {
        "model": model,
        "feature_net": feature_net,
        "pretrain_history": step1.history,
        "finetune_history": step2.history,
        "n_pretrain_epochs": len(balanced),
        "batcher": NightSequenceBatcher(finetune.seq_length),
    }


def train_sleepeegnet(train: ArraySet, select: ArraySet | None = None, *, sfreq: float = 100.0,
                      config: SeqTrainConfig | None = None, model_kw: dict | None = None,
                      device: str = "cpu", out_dir=None, resume: bool = True) -> dict[str, Any]:
    """SleepEEGNet's training with checkpoint selection every ``select_every`` epochs.

    Inputs must already be z-scored per epoch (:func:`~sleeplib.train.sequence.zscore_epochs`,
    done by :func:`run_seq_cv`). The training set is oversampled and cut into sequences here.
    Every ``config.select_every`` epochs (and after the last) ``select`` is scored with free-running
    decoding; the weights with the best macro-F1 are kept (strict ``>``, starting from 0, as their
    code). Without ``select`` the last epoch is kept.

    Returns
    -------
    dict
        ``model`` (kept weights loaded), ``history`` (DataFrame of the training epochs with
        ``select_macro_f1`` on the evaluated ones), ``best_epoch``, ``oversampling`` summary.
    """
    from sleeplib.metrics import summarize

    from sleeplib.models.sleepeegnet import SleepEEGNet

    config = config or SLEEPEEGNET
    model_kw = dict(model_kw or {})
    train_set, oversampling = sleepeegnet_training_set(train, config.seq_length, config.oversample, seed=config.seed)
    torch.manual_seed(config.seed)
    model = SleepEEGNet(n_chans=int(train.x.shape[1]), sfreq=sfreq, n_times=int(train.x.shape[2]), **model_kw)
    batcher = Seq2SeqBatcher(config.seq_length, teacher_forcing=config.teacher_forcing)
    loss_fn = get_seq_loss(config.loss, config.seq_length)
    stops = list(range(config.select_every, config.epochs + 1, config.select_every))
    if not stops or stops[-1] != config.epochs:
        stops.append(config.epochs)
    best_f1, best_epoch, best_state, scores, done = 0.0, stops[-1], None, {}, 0
    with contextlib.ExitStack() as stack:
        run_dir = _run_dir(out_dir, "sleepeegnet", stack)
        # The selection (scores, kept weights) is saved beside the trainer's checkpoint after every
        # evaluation, so a resumed or finished run keeps the checkpoint it had chosen.
        selection_path = run_dir / "selection.pt"
        if resume and selection_path.exists():
            saved = torch.load(selection_path, map_location="cpu", weights_only=False)
            best_f1, best_epoch, best_state = saved["best_f1"], saved["best_epoch"], saved["best_state"]
            scores, done = saved["scores"], saved["done"]
        result = None
        for stop in stops:
            if stop <= done and stop != stops[-1]:
                continue
            result = _trainer.fit(model, train_set, None, config=config, batcher=batcher, loss_fn=loss_fn,
                                  out_dir=run_dir, device=device, resume=True if stop != stops[0] else resume,
                                  stop_after=stop, desc="sleepeegnet")
            if select is None or stop <= done:
                continue
            probs = _trainer.predict(model, select, batch_size=config.eval_batch_size, device=device, batcher=batcher)
            f1 = summarize(select.y.numpy(), probs.argmax(1))["macro_f1"]
            scores[stop] = f1
            if f1 > best_f1:
                best_f1, best_epoch = f1, stop
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            with atomic_path(selection_path, suffix=".pt") as tmp:
                torch.save({"best_f1": best_f1, "best_epoch": best_epoch, "best_state": best_state,
                            "scores": scores, "done": stop}, tmp)
    if best_state is not None:
        model.load_state_dict(best_state)
    history = result.history.copy()
    history["select_macro_f1"] = history["epoch"].map(scores)
    return {"model": model, "history": history, "best_epoch": int(best_epoch), "best_select_f1": best_f1,
            "oversampling": oversampling, "batcher": batcher}


# ------------------------------------------------------------------------------------------- protocols

SEQ_PROTOCOL_LABELS = {
    ("deepsleepnet", "paper"): "paper (subject-wise, one subject per fold, last epoch: no leakage; same as clean)",
    ("deepsleepnet", "clean"): "clean (subject-wise, last epoch; identical to the published protocol)",
    ("sleepeegnet", "paper"): ("paper (optimistic: night-level split, so a subject's other night can be in training, "
                               "and the checkpoint is selected on the test fold)"),
    ("sleepeegnet", "clean"): "clean (subject-wise folds, checkpoint selected on validation subjects)",
    ("deepsleepnet", "time-block"): _ENGINE_PROTOCOL_LABELS["time-block"],
    ("sleepeegnet", "time-block"): _ENGINE_PROTOCOL_LABELS["time-block"],
}


@dataclass
class SeqFold:
    """One fold: positions in a :class:`~sleeplib.data.dataset.SleepNights` (or, for time-block,
    epoch indices of its single night). ``select`` is None when the last epoch is kept."""

    fold: int
    protocol: str
    label: str
    train: np.ndarray
    select: np.ndarray | None
    test: np.ndarray
    unit: str = "night"


def night_level_folds(n_nights: int, n_folds: int, seed: int = 0) -> list[np.ndarray]:
    """SleepEEGNet's published split: night files permuted, then ``array_split`` into folds.

    Their ``dataloader.py`` draws ``np.random.permutation`` of the sorted night files once and
    saves it (``r_permute.npz``, not in the repository), so the permutation is seeded here.
    """
    if not 1 <= n_folds <= n_nights:
        raise ValueError(f"n_folds must be in 1..{n_nights} (number of nights), got {n_folds}")
    order = np.random.default_rng(seed).permutation(n_nights)
    return [np.sort(part) for part in np.array_split(order, n_folds)]


def seq_splits(nights, model: str, protocol: str, n_folds: int | None = None, seed: int = 0,
               val_fraction: float = 0.1, time_block_folds: int = 5) -> list[SeqFold]:
    """Folds of ``nights`` for ``model`` under ``protocol`` ("paper", "clean" or "time-block").

    * DeepSleepNet, paper/clean: subject-wise, subjects in sorted order, ``n_folds`` parts (default
      one subject per fold, as ``SC4{k}`` in their loader); no selection set.
    * SleepEEGNet, paper: :func:`night_level_folds`; the test fold is also the selection set.
    * SleepEEGNet, clean: subject-wise (seeded permutation); validation subjects drawn from the
      training subjects select the checkpoint.
    * time-block (one night): contiguous blocks of the night (not comparable to the papers);
      SleepEEGNet selects on a validation block, DeepSleepNet keeps the last epoch.
    """
    from sleeplib.data.dataset import subject_folds

    model = model.lower()
    if model not in ("deepsleepnet", "sleepeegnet"):
        raise ValueError(f"model must be 'deepsleepnet' or 'sleepeegnet', got {model!r}")
    label = SEQ_PROTOCOL_LABELS.get((model, protocol))
    if label is None:
        raise ValueError(f"protocol must be 'paper', 'clean' or 'time-block', got {protocol!r}")
    if protocol == "time-block":
        if len(nights) != 1:
            raise ValueError(f"time-block splits are for one night; got {len(nights)} nights, use 'paper' or 'clean'")
        blocks = time_block_splits(len(nights[0].y), n_folds=n_folds or time_block_folds)
        return [SeqFold(s.fold, protocol, label, s.train, s.val if model == "sleepeegnet" else None, s.test, "epoch")
                for s in blocks]
    subjects = np.array([n.subject for n in nights])
    unique = np.unique(subjects)
    positions = {s: np.flatnonzero(subjects == s) for s in unique}
    folds = []
    if model == "sleepeegnet" and protocol == "paper":
        for k, test in enumerate(night_level_folds(len(nights), n_folds or min(20, len(nights)), seed)):
            train = np.setdiff1d(np.arange(len(nights)), test)
            folds.append(SeqFold(k, protocol, label, train, test, test))
        return folds
    if len(unique) < 2:
        raise ValueError(f"subject-wise folds need at least 2 subjects, got {unique.tolist()}; use protocol='time-block'")
    n_folds = n_folds or len(unique)
    parts = subject_folds(unique, n_folds, seed=seed if model == "sleepeegnet" else None)
    rng = np.random.default_rng(seed)
    for k, test_subjects in enumerate(parts):
        rest = np.setdiff1d(unique, test_subjects)
        select_subjects = None
        if model == "sleepeegnet":
            if len(rest) < 2:
                raise ValueError(f"fold {k} leaves {len(rest)} training subject(s); the clean protocol needs 2+")
            n_val = min(max(1, int(round(val_fraction * len(rest)))), len(rest) - 1)
            select_subjects = np.sort(rng.choice(rest, size=n_val, replace=False))
            rest = np.setdiff1d(rest, select_subjects)
        take = lambda subs: np.sort(np.concatenate([positions[s] for s in subs]))  # noqa: E731
        folds.append(SeqFold(k, protocol, label, take(rest), None if select_subjects is None else take(select_subjects),
                             take(test_subjects)))
    return folds


def _epoch_subset(night, index: np.ndarray) -> ArraySet:
    """Epochs ``index`` of one night; a gap in the indices starts a new "night" so sequence
    batchers never join epochs that were not adjacent."""
    index = np.sort(np.asarray(index))
    segment = np.concatenate([[0], np.cumsum(np.diff(index) != 1)])
    return ArraySet.from_arrays(np.asarray(night.x)[index], np.asarray(night.y)[index], segment)


def _arrays(nights, fold: SeqFold, which: str, zscore: bool) -> ArraySet | None:
    index = getattr(fold, which)
    if index is None:
        return None
    data = _epoch_subset(nights[0], index) if fold.unit == "epoch" else ArraySet.from_nights([nights[i] for i in index])
    if zscore:
        data = ArraySet(zscore_epochs(data.x), data.y, data.night)
    return data


def run_seq_cv(nights, model: str, *, protocol: str = "paper", n_folds: int | None = None,
               max_folds: int | None = None, config: SeqTrainConfig | None = None,
               pretrain: SeqTrainConfig | None = None, model_kw: dict | None = None, device: str = "cpu",
               out_dir=None, seed: int = 0, sfreq: float | None = None) -> dict[str, Any]:
    """Cross-validate DeepSleepNet or SleepEEGNet with its recipe and collect per-night predictions.

    Parameters
    ----------
    nights : SleepNights
        Prepared nights (one channel as in the papers, or several).
    model : {"deepsleepnet", "sleepeegnet"}
    protocol : {"paper", "clean", "time-block"}
        See :func:`seq_splits`; "time-block" needs exactly one night.
    n_folds : int, optional
        Folds (default: one subject per fold / 20 night-folds / 5 time blocks).
    max_folds : int, optional
        Train only the first folds (smoke runs); the report says how many ran.
    config : SeqTrainConfig, optional
        DeepSleepNet: the fine-tuning config (default :data:`DEEPSLEEPNET_FINETUNE`);
        SleepEEGNet: :data:`SLEEPEEGNET`.
    pretrain : SeqTrainConfig, optional
        DeepSleepNet's pre-training config (default :data:`DEEPSLEEPNET_PRETRAIN`).
    out_dir : path, optional
        Run folder, one sub-folder per fold (resumable); None: temporary.

    Returns
    -------
    dict
        ``predictions`` (DataFrame: fold, record, subject, night, epoch, y_true, y_pred),
        ``folds`` (list of per-fold dicts: subjects/records, histories, seconds, best_epoch),
        ``protocol``, ``label``, ``n_folds_total``, ``n_folds_run``, ``n_parameters``, ``last_model``.
    """
    model = model.lower()
    folds = seq_splits(nights, model, protocol, n_folds=n_folds, seed=seed)
    run = folds[: max_folds] if max_folds else folds
    sfreq = float(sfreq or nights[0].fs)
    zscore = model == "sleepeegnet"  # their loader z-scores every epoch; DeepSleepNet uses raw microvolts
    rows, fold_info, trained = [], [], None
    for fold in run:
        t0 = time.perf_counter()
        fold_dir = None if out_dir is None else Path(out_dir) / f"fold{fold.fold:02d}"
        train = _arrays(nights, fold, "train", zscore)
        test = _arrays(nights, fold, "test", zscore)
        if model == "deepsleepnet":
            trained = train_deepsleepnet(train, sfreq=sfreq, pretrain=pretrain, finetune=config, model_kw=model_kw,
                                         device=device, out_dir=fold_dir)
            histories = {"pretrain": trained["pretrain_history"], "finetune": trained["finetune_history"]}
            best_epoch = int(trained["finetune_history"]["epoch"].max())
            eval_batch = 1
        else:
            select = _arrays(nights, fold, "select", zscore)
            trained = train_sleepeegnet(train, select, sfreq=sfreq, config=config, model_kw=model_kw,
                                        device=device, out_dir=fold_dir)
            histories = {"train": trained["history"]}
            best_epoch = trained["best_epoch"]
            eval_batch = (config or SLEEPEEGNET).eval_batch_size
        probs = _trainer.predict(trained["model"], test, batch_size=eval_batch, device=device, batcher=trained["batcher"])
        y_pred = probs.argmax(1)
        if fold.unit == "epoch":
            night = nights[0]
            meta = [(night.record, night.subject, night.night, np.sort(fold.test))]
        else:
            meta = [(nights[i].record, nights[i].subject, nights[i].night, np.arange(len(nights[i].y))) for i in fold.test]
        offset, fold_rows = 0, []
        for record, subject, night_no, epochs in meta:
            n = len(epochs)
            fold_rows.append(pd.DataFrame({"fold": fold.fold, "record": record, "subject": subject, "night": night_no,
                                           "epoch": epochs, "y_true": test.y.numpy()[offset : offset + n],
                                           "y_pred": y_pred[offset : offset + n]}))
            offset += n
        rows.extend(fold_rows)
        if fold_dir is not None:
            # per-night test predictions on disk, so every table can be recomputed without retraining
            with atomic_path(fold_dir / "predictions.csv", suffix=".csv") as tmp:
                pd.concat(fold_rows, ignore_index=True).to_csv(tmp, index=False)
        fold_info.append({
            "fold": fold.fold,
            "train": fold.train.tolist(), "select": None if fold.select is None else fold.select.tolist(),
            "test": fold.test.tolist(), "unit": fold.unit, "histories": histories, "best_epoch": best_epoch,
            "seconds": time.perf_counter() - t0,
            "oversampling": trained.get("oversampling"),
        })
    return {
        "predictions": pd.concat(rows, ignore_index=True),
        "folds": fold_info,
        "protocol": protocol,
        "label": folds[0].label,
        "n_folds_total": len(folds),
        "n_folds_run": len(run),
        "n_parameters": count_parameters(trained["model"]),
        "last_model": trained["model"],
    }


def load_seq_predictions(out_dir: str | Path) -> pd.DataFrame:
    """The test predictions :func:`run_seq_cv` saved in ``out_dir`` (``fold*/predictions.csv``), no training.

    ``cv_summary({"predictions": load_seq_predictions(out_dir)})`` recomputes the tables.
    """
    paths = sorted(Path(out_dir).glob("fold*/predictions.csv"))
    if not paths:
        raise FileNotFoundError(f"no finished fold with predictions.csv in {out_dir}; run run_seq_cv(..., out_dir=...)")
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def cv_summary(result: dict[str, Any]) -> dict[str, Any]:
    """:func:`sleeplib.metrics.fold_summary` of :func:`run_seq_cv`'s test predictions (pooled = the
    papers' figure)."""
    from sleeplib.metrics import fold_summary

    pred = result["predictions"]
    return fold_summary({k: (g["y_true"].to_numpy(), g["y_pred"].to_numpy()) for k, g in pred.groupby("fold")})


def default_ablation(model: str) -> dict[str, dict[str, Any]]:
    """The short ablation of the notebooks: variant name -> config changes.

    The first entry (no changes) is the recipe as passed to :func:`run_ablation` (the paper's, or the
    profile's tiny version). SleepEEGNet: free-running decoding in training, sequence length 5 and
    20, MSFE and plain cross-entropy instead of MFE. DeepSleepNet: sequence length 10, and
    pre-training without class balancing.
    """
    if model == "sleepeegnet":
        return {
            "recipe as configured (teacher forcing)": {},
            "free-running decoding in training": {"teacher_forcing": False},
            "sequence length 5": {"seq_length": 5},
            "sequence length 20": {"seq_length": 20},
            "MSFE loss": {"loss": "msfe"},
            "plain cross-entropy": {"loss": "ce"},
        }
    if model == "deepsleepnet":
        return {
            "recipe as configured": {},
            "sequence length 10": {"seq_length": 10},
            "no oversampling in pre-training": {"pretrain": {"oversample": "none"}},
        }
    raise ValueError(f"model must be 'deepsleepnet' or 'sleepeegnet', got {model!r}")


def run_ablation(nights, model: str, variants: dict[str, dict[str, Any]] | None = None, *,
                 config: SeqTrainConfig | None = None, pretrain: SeqTrainConfig | None = None,
                 baseline: dict[str, Any] | None = None, **cv_kw) -> pd.DataFrame:
    """Run :func:`run_seq_cv` once per variant and tabulate the pooled test metrics.

    Parameters
    ----------
    variants : dict, optional
        Name -> changes to ``config`` (a ``"pretrain"`` key holds changes to ``pretrain``);
        default :func:`default_ablation`.
    config, pretrain : SeqTrainConfig, optional
        The base recipe (e.g. the notebook's tiny smoke configuration).
    baseline : dict, optional
        A :func:`run_seq_cv` result already computed with ``config``/``pretrain`` and the same
        ``cv_kw``; variants without changes reuse it instead of training again.
    **cv_kw
        Passed to :func:`run_seq_cv` (protocol, n_folds, max_folds, model_kw, device, ...).

    Returns
    -------
    pandas.DataFrame
        One row per variant: accuracy, macro_f1, kappa (pooled), n_epochs, seconds.
    """
    model = model.lower()
    base = config or (DEEPSLEEPNET_FINETUNE if model == "deepsleepnet" else SLEEPEEGNET)
    base_pre = pretrain or DEEPSLEEPNET_PRETRAIN
    rows = {}
    for name, changes in (variants or default_ablation(model)).items():
        changes = dict(changes)
        pre_changes = changes.pop("pretrain", {})
        t0 = time.perf_counter()
        if baseline is not None and not changes and not pre_changes:
            result = baseline
        else:
            result = run_seq_cv(nights, model, config=base.replace(**changes),
                                pretrain=base_pre.replace(**pre_changes), **cv_kw)
        pooled = cv_summary(result)["pooled"]
        seconds = sum(f["seconds"] for f in result["folds"]) if result is baseline else time.perf_counter() - t0
        rows[name] = {"accuracy": pooled["accuracy"], "macro_f1": pooled["macro_f1"], "kappa": pooled["kappa"],
                      "n_epochs": pooled["n_epochs"], "seconds": seconds}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "variant"
    return table
