"""Cross-validation runner: train every fold, save per-night predictions, recompute tables later.

Layout of ``out_dir`` (one folder per fold, each written atomically and skipped when present)::

    fold_00/predictions.npz   y_true, y_pred, probs, record, subject, night, epoch_in_night, fold
    fold_00/history.csv       per-epoch training curve (train loss/acc, selection-set metrics)
    fold_00/fold.json         split (subjects), protocol label, best epoch, class weights, config
    fold_00/model.pt          weights of the selected epoch
    fold_00/checkpoint.pt     (eager engine) resume point while the fold is training

:func:`load_cv` rebuilds :class:`CVResults` from these files without retraining.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from sleeplib.io import atomic_path, save_json, save_npz
from sleeplib.train.batching import ArraySet
from sleeplib.train.config import TrainConfig, get_recipe
from sleeplib.train.protocols import PROTOCOL_LABELS, FoldSplit, class_weight_counts, make_splits, time_block_splits
from sleeplib.train.trainer import fit, predict, resolve_class_weights, seed_everything

__all__ = ["run_cv", "load_cv", "CVResults"]


@dataclass
class CVResults:
    """Saved test predictions of a cross-validation, and the tables computed from them.

    Attributes
    ----------
    predictions : pandas.DataFrame
        One row per test epoch: ``fold, subject, record, night, epoch_in_night, y_true, y_pred``
        and ``p_W .. p_REM``.
    histories : dict of int -> DataFrame
        Per-epoch training curves of every fold.
    folds : dict of int -> dict
        ``fold.json`` of every fold (split, protocol label, best epoch, class weights, config).
    """

    predictions: pd.DataFrame
    histories: dict[int, pd.DataFrame] = field(default_factory=dict)
    folds: dict[int, dict] = field(default_factory=dict)

    @property
    def protocol_label(self) -> str:
        labels = {f.get("label", "") for f in self.folds.values()}
        return "; ".join(sorted(labels))

    def summary(self) -> dict:
        """:func:`sleeplib.metrics.fold_summary` of the saved predictions (pooled and per fold)."""
        from sleeplib.metrics import fold_summary

        groups = {int(k): (g["y_true"].to_numpy(), g["y_pred"].to_numpy()) for k, g in self.predictions.groupby("fold")}
        return fold_summary(groups)

    def per_night(self) -> pd.DataFrame:
        """Headline metrics per test night (record)."""
        from sleeplib.metrics import summarize

        rows = {rec: summarize(g["y_true"], g["y_pred"]) for rec, g in self.predictions.groupby("record")}
        return pd.DataFrame.from_dict(rows, orient="index")


def _meta_arrays(nights) -> dict[str, np.ndarray]:
    subject, record, night, pos = [], [], [], []
    for n in nights:
        m = len(n.y)
        subject.append(np.full(m, int(n.subject)))
        record.append(np.full(m, str(n.record), dtype=object))
        night.append(np.full(m, int(getattr(n, "night", 1))))
        pos.append(np.arange(m))
    return {"subject": np.concatenate(subject), "record": np.concatenate(record).astype(str),
            "night": np.concatenate(night), "epoch_in_night": np.concatenate(pos)}


def _split_rows(split: FoldSplit, meta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if split.unit == "epoch":
        return {"train": split.train, "val": split.val, "test": split.test}
    s = meta["subject"]
    return {name: np.flatnonzero(np.isin(s, getattr(split, name))) for name in ("train", "val", "test")}


def _fold_dir(out_dir: Path, k: int) -> Path:
    return out_dir / f"fold_{k:02d}"


def _save_fold(fdir: Path, k: int, split: FoldSplit, rows: dict, meta: dict, y: np.ndarray, probs: np.ndarray,
               history: pd.DataFrame, best_epoch: int, best_state: dict, weights, config: TrainConfig,
               model_name: str, engine: str) -> None:
    test = rows["test"]
    fdir.mkdir(parents=True, exist_ok=True)
    with atomic_path(fdir / "model.pt", suffix=".pt") as tmp:
        torch.save(best_state, tmp)
    with atomic_path(fdir / "history.csv", suffix=".csv") as tmp:
        history.to_csv(tmp, index=False)
    save_json(fdir / "fold.json", {
        "fold": k, "protocol": split.protocol, "label": split.label, "unit": split.unit,
        "train": split.train, "val": split.val, "test": split.test, "best_epoch": best_epoch,
        "class_weights": weights, "weights_from": list(split.weight_from), "model": model_name,
        "engine": engine, "config": config.to_dict(),
    })
    # predictions last: their presence marks the fold as finished
    save_npz(fdir / "predictions.npz", y_true=y[test], y_pred=probs.argmax(1), probs=probs.astype(np.float32),
             record=meta["record"][test], subject=meta["subject"][test], night=meta["night"][test],
             epoch_in_night=meta["epoch_in_night"][test], fold=np.full(len(test), k))


def run_cv(
    model_name: str,
    nights: Iterable,
    protocol: str = "paper",
    folds: str | Sequence[int] = "all",
    config: TrainConfig | str | None = None,
    out_dir: str | os.PathLike = "runs/cv",
    device: str = "cpu",
    *,
    dataset: str | None = None,
    n_folds: int | None = None,
    val_fraction: float = 0.1,
    engine: str = "eager",
    model_kwargs: dict[str, Any] | None = None,
    fold_batch: int | None = None,
    compile: bool | None = None,
) -> CVResults:
    """Cross-validate ``model_name`` on ``nights`` and save every fold's test predictions.

    Parameters
    ----------
    model_name : str
        Name in :data:`sleeplib.models.MODELS` (built with ``n_chans``, ``sfreq``, ``n_times`` of
        the data plus ``model_kwargs``).
    nights : iterable of Night
        Objects with ``x (N, T) or (N, C, T)``, ``y``, ``subject``, ``night``, ``record``, ``fs``
        (e.g. :func:`sleeplib.data.dataset.load_nights`).
    protocol : {"paper", "clean", "time-block"}
        See :mod:`sleeplib.train.protocols`. "time-block" needs exactly one night.
    folds : "all" or list of int
        Folds to run; finished folds (``predictions.npz`` present) are skipped.
    config : TrainConfig or recipe name, optional
        Default: the ``"attnsleep"`` recipe.
    out_dir : path
        Run folder (see the module docstring).
    device : str
    dataset : str, optional
        "sleep-edf-20" / "sleep-edf-78" select AttnSleep's published permutation and fold count.
    n_folds : int, optional
        Folds when no published split applies (default: one subject per fold; 5 for time-block).
    engine : {"eager", "batched", "auto"}
        "eager": :func:`sleeplib.train.trainer.fit`, one fold after another, resumable per epoch.
        "batched": :class:`sleeplib.train.fast.BatchedFolds`, ``fold_batch`` folds at once (all by
        default); 15-21x the naive loop on an H100, but 2x slower than it on a 2-core CPU
        (``benchmarks/RESULTS.md``). "auto": batched on CUDA, eager elsewhere.
    compile : bool, optional
        ``engine="batched"`` only: fuse the vmapped forward and backward, the optimiser update and
        the evaluation forward with ``torch.compile`` (default: on CUDA). Costs about 100 s of
        compilation once per process; on an H100 it takes the time per fold-epoch from 0.69 s to
        0.29 s (``benchmarks/RESULTS.md``).

    Returns
    -------
    CVResults
        Everything saved in ``out_dir`` (also for folds finished by earlier calls).
    """
    from sleeplib.models import build_model

    if engine not in ("eager", "batched", "auto"):
        raise ValueError(f"engine must be 'eager', 'batched' or 'auto', got {engine!r}")
    if engine == "auto":  # the batched engine pays off on a GPU only (2x slower on 2 CPU cores)
        engine = "batched" if torch.device(device).type == "cuda" else "eager"
    from sleeplib.models import NOT_VMAPPABLE

    if engine == "batched" and model_name in NOT_VMAPPABLE:
        warnings.warn(f"{model_name} cannot train several folds at once (vmap); using engine='eager'",
                      stacklevel=2)
        engine = "eager"
    if config is None:
        config = get_recipe("attnsleep")
    elif isinstance(config, str):
        config = get_recipe(config)
    nights = list(nights)
    if not nights:
        raise ValueError("no nights given; load some with sleeplib.data.dataset.load_nights()")
    out_dir = Path(out_dir)
    meta = _meta_arrays(nights)
    x = np.concatenate([np.asarray(n.x, dtype=np.float32) for n in nights])
    if x.ndim == 2:
        x = x[:, None, :]
    y = np.concatenate([np.asarray(n.y, dtype=np.int64) for n in nights])
    if protocol == "time-block":
        if len(nights) != 1:
            raise ValueError(f"the time-block protocol splits one night; got {len(nights)} nights. "
                             "Use protocol='paper' or 'clean' for several subjects")
        splits = time_block_splits(len(y), n_folds or 5, val_fraction)
    elif protocol in ("paper", "clean"):
        splits = make_splits(meta["subject"], protocol, dataset=dataset, n_folds=n_folds,
                             val_fraction=val_fraction, seed=config.seed)
    else:
        raise ValueError(f"protocol must be 'paper', 'clean' or 'time-block', got {protocol!r}")
    wanted = range(len(splits)) if folds == "all" else [int(k) for k in folds]
    bad = [k for k in wanted if not 0 <= k < len(splits)]
    if bad:
        raise ValueError(f"folds {bad} do not exist; this split has folds 0..{len(splits) - 1}")
    pending = [k for k in wanted if not (_fold_dir(out_dir, k) / "predictions.npz").exists()]
    save_json(out_dir / "cv.json", {"model": model_name, "protocol": protocol, "label": PROTOCOL_LABELS[protocol],
                                    "dataset": dataset, "n_folds": len(splits), "config": config.to_dict()})
    fs = float(getattr(nights[0], "fs", 100.0))
    model_kwargs = dict(model_kwargs or {})

    def make_model():
        return build_model(model_name, n_chans=x.shape[1], sfreq=fs, n_times=x.shape[2], **model_kwargs)

    def weights_for(split, rows):
        counts = class_weight_counts({name: y[idx] for name, idx in rows.items()}, split)
        return resolve_class_weights(config.class_weights, counts)

    if engine == "eager":
        for k in pending:
            split, fdir = splits[k], _fold_dir(out_dir, k)
            rows = _split_rows(split, meta)
            weights = weights_for(split, rows)
            seed_everything(config.seed)
            model = make_model()
            sets = {name: ArraySet.from_arrays(x[idx], y[idx]) for name, idx in rows.items()}
            result = fit(model, sets["train"], sets["val"], config=config, class_weights=weights,
                         out_dir=fdir, device=device, desc=f"fold {k}")
            probs = result.val_probs if split.val_is_test else predict(
                model, sets["test"], batch_size=config.eval_batch_size, device=device, amp=config.amp)
            _save_fold(fdir, k, split, rows, meta, y, probs, result.history, result.best_epoch,
                       result.best_state, weights, config, model_name, engine)
    else:
        from sleeplib.train.fast import BatchedFolds

        group = fold_batch or max(1, len(pending))
        for g in range(0, len(pending), group):
            ks = pending[g:g + group]
            rows = [_split_rows(splits[k], meta) for k in ks]
            weights = [weights_for(splits[k], r) for k, r in zip(ks, rows)]
            cw = None if all(w is None for w in weights) else [w if w is not None else [1.0] * 5 for w in weights]
            engine_ = BatchedFolds(make_model, torch.from_numpy(x), torch.from_numpy(y),
                                   [r["train"] for r in rows], [r["val"] for r in rows], cw, config, device=device,
                                   compile=(torch.device(device).type == "cuda") if compile is None else compile)
            ckpt = out_dir / f"batched_{ks[0]:02d}-{ks[-1]:02d}.pt"
            outcomes = engine_.fit(checkpoint=ckpt)
            for k, r, w, out in zip(ks, rows, weights, outcomes):
                split = splits[k]
                if split.val_is_test:
                    probs = out.val_probs
                else:
                    model = make_model()
                    model.load_state_dict(out.best_state)
                    probs = predict(model.to(device), ArraySet.from_arrays(x[r["test"]], y[r["test"]]),
                                    batch_size=config.eval_batch_size, device=device, amp=config.amp)
                _save_fold(_fold_dir(out_dir, k), k, split, r, meta, y, probs, out.history, out.best_epoch,
                           out.best_state, w, config, model_name, engine)
            ckpt.unlink(missing_ok=True)
    return load_cv(out_dir)


def load_cv(out_dir: str | os.PathLike) -> CVResults:
    """Rebuild :class:`CVResults` from a run folder (no training).

    Raises
    ------
    FileNotFoundError
        If no fold of ``out_dir`` has finished.
    """
    from sleeplib import STAGES

    out_dir = Path(out_dir)
    frames, histories, folds = [], {}, {}
    for fdir in sorted(out_dir.glob("fold_*")):
        pred = fdir / "predictions.npz"
        if not pred.exists():
            continue
        with np.load(pred, allow_pickle=False) as z:
            df = pd.DataFrame({key: z[key] for key in ("fold", "subject", "record", "night", "epoch_in_night",
                                                       "y_true", "y_pred")})
            probs = z["probs"]
        for j, stage in enumerate(STAGES[: probs.shape[1]]):
            df[f"p_{stage}"] = probs[:, j]
        frames.append(df)
        k = int(df["fold"].iloc[0]) if len(df) else int(fdir.name.split("_")[1])
        histories[k] = pd.read_csv(fdir / "history.csv")
        folds[k] = json.loads((fdir / "fold.json").read_text())
    if not frames:
        raise FileNotFoundError(f"no finished fold (fold_*/predictions.npz) in {out_dir}; run run_cv first")
    return CVResults(pd.concat(frames, ignore_index=True), histories, folds)
