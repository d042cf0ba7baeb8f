"""The training loop shared by every model (eager, one model at a time, CPU or CUDA).

:func:`fit` trains one model on one training set, evaluates a selection set after every epoch,
keeps the weights of the best epoch, checkpoints every epoch (atomically) and resumes after an
interruption to the same result. Batching and the loss are pluggable (see
:mod:`sleeplib.train.batching`), and the optimiser takes per-parameter-group learning rates.

Determinism: on CPU a run is bit-for-bit repeatable, and a resumed run ends with the same weights as
an uninterrupted one (``tests/test_train.py`` checks this). On CUDA, cuDNN/cuBLAS kernels chosen for
speed (``cudnn.benchmark``) and atomics in some backward kernels make results vary in the last bits
from run to run; ``TrainConfig(deterministic=True)`` asks torch for deterministic kernels.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from sleeplib.io import atomic_path
from sleeplib.train.batching import ArraySet, get_batcher
from sleeplib.train.config import TrainConfig, attnsleep_class_weights, lr_factor

__all__ = [
    "LOSSES",
    "weighted_cross_entropy",
    "resolve_class_weights",
    "build_optimizer",
    "predict",
    "FitResult",
    "fit",
    "seed_everything",
]

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.csv"


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Class-weighted cross-entropy, mean normalised by the summed weights (torch's convention)."""
    return F.cross_entropy(logits.float(), target, weight=weight)


LOSSES: dict[str, Callable] = {"weighted_ce": weighted_cross_entropy}
"""Losses by name: ``loss(logits (n, K), target (n,), class_weight (K,) or None) -> scalar``."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_class_weights(spec: Any, counts) -> list[float] | None:
    """Turn ``TrainConfig.class_weights`` into a list of weights (or None for unweighted).

    Parameters
    ----------
    spec : {"attnsleep", "balanced", "none", None} or sequence of float
    counts : array-like of int
        Epochs per class of the labels the weights are computed from (which labels is a protocol
        decision, see :mod:`sleeplib.train.protocols`).
    """
    if spec is None or (isinstance(spec, str) and spec == "none"):
        return None
    if isinstance(spec, str):
        counts = np.asarray(counts, dtype=np.float64)
        if spec == "attnsleep":
            return attnsleep_class_weights(counts)
        if spec == "balanced":
            present = counts > 0
            weights = np.zeros_like(counts)
            weights[present] = counts[present].sum() / (present.sum() * counts[present])
            return weights.tolist()
        raise ValueError(f"unknown class_weights {spec!r}; use 'attnsleep', 'balanced', 'none' or a list")
    return [float(w) for w in spec]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Optimiser of ``config`` with ``config.param_groups`` (first matching substring wins).

    Every group records its ``base_lr`` so the schedule (:func:`sleeplib.train.config.lr_factor`)
    scales all groups by the same factor.
    """
    groups: list[dict[str, Any]] = [dict(g, params=[]) for g in config.param_groups]
    default: dict[str, Any] = {"params": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        for group in groups:
            if group["match"] in name:
                group["params"].append(param)
                break
        else:
            default["params"].append(param)
    param_groups = [default] + [g for g in groups if g["params"]]
    for g in param_groups:
        g.pop("match", None)
        g.setdefault("lr", config.lr)
        g.setdefault("weight_decay", config.weight_decay)
        g["base_lr"] = g["lr"]
    if config.optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=config.lr, betas=config.betas, eps=config.eps,
                                weight_decay=config.weight_decay, amsgrad=config.amsgrad)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas, eps=config.eps,
                                 weight_decay=config.weight_decay, amsgrad=config.amsgrad)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(param_groups, lr=config.lr, alpha=config.rmsprop_alpha, eps=config.rmsprop_eps,
                                   weight_decay=config.weight_decay, momentum=0.0)
    return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: int) -> float:
    factor = lr_factor(config, epoch)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def _autocast(device: torch.device, amp: str):
    if amp == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict(model: nn.Module, data: ArraySet, *, batch_size: int = 512, device="cpu", batcher="epoch",
            amp: str = "none") -> np.ndarray:
    """Class probabilities ``(N, K)`` (float32, numpy) for every epoch of ``data``, in data order."""
    device = torch.device(device)
    batcher = get_batcher(batcher)
    was_training = model.training
    model.eval()
    out, state = [], None
    for batch in batcher.eval_batches(data, batch_size):
        batch = type(batch)(batch.x.to(device, non_blocking=True), batch.y.to(device), batch.reset)
        with _autocast(device, amp):
            logits, _, state = batcher.forward(model, batch, state)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    history : pandas.DataFrame
        One row per epoch: ``epoch, lr, train_loss, train_acc`` and, with a selection set,
        ``val_loss, val_accuracy, val_macro_f1, val_kappa``; ``seconds``.
    best_epoch : int
        Epoch whose weights were kept (the last one without a selection set).
    best_score : float
        ``config.monitor`` on the selection set at ``best_epoch`` (NaN without one).
    best_state : dict
        ``state_dict`` of the kept epoch (on CPU). The model passed in is left with these weights.
    val_probs : numpy.ndarray or None
        Selection-set probabilities at ``best_epoch``.
    stopped_early : bool
    """

    history: pd.DataFrame
    best_epoch: int
    best_score: float
    best_state: dict
    val_probs: np.ndarray | None = None
    stopped_early: bool = False
    extra: dict = field(default_factory=dict)


def _score(monitor: str, y_true: np.ndarray, probs: np.ndarray, loss: float) -> dict:
    from sleeplib.metrics import confusion_matrix, headline_from_confusion

    scores = headline_from_confusion(confusion_matrix(y_true, probs.argmax(1), labels=range(probs.shape[1])))
    return {"val_loss": loss, **{f"val_{name}": value for name, value in scores.items()}}


def _improved(monitor: str, score: float, best: float) -> bool:
    # strict comparison: a tie keeps the earlier epoch, as AttnSleep's `>`.
    if np.isnan(best):
        return True
    return score < best if monitor == "loss" else score > best


def _rng_state(generator: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "shuffle": generator.get_state(),
    }


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["shuffle"])


def _check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    current = config.to_dict()
    differ = [k for k in current if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if differ:
        raise ValueError(
            f"checkpoint {path} was written with different settings {differ}; delete it (or the run "
            "folder) to start over, or pass resume=False"
        )


def _tensorboard(out_dir: Path | None):
    if out_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def fit(
    model: nn.Module,
    train: ArraySet,
    val: ArraySet | None = None,
    *,
    config: TrainConfig,
    class_weights: list[float] | None = None,
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batcher: Any = None,
    loss_fn: Callable | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` on ``train``, selecting the epoch by ``config.monitor`` on ``val``.

    Parameters
    ----------
    model : torch.nn.Module
        Freshly built model; ``config.weight_init`` and the seed are applied here.
    train, val : ArraySet
        Training set and selection set (validation subjects, or the test fold in the paper
        protocol). Without ``val`` the last epoch is kept.
    config : TrainConfig
    class_weights : list of float, optional
        Cross-entropy weights; see :func:`resolve_class_weights`. None: unweighted.
    out_dir : path, optional
        Run folder for ``checkpoint.pt`` (every ``config.checkpoint_every`` epochs, atomic),
        ``history.csv`` and TensorBoard logs. None: nothing written, no resume.
    device : str or torch.device
    batcher : batcher object or name, optional
        Overrides ``config.batcher`` (see :mod:`sleeplib.train.batching`).
    loss_fn : callable, optional
        ``loss_fn(logits, target, class_weight)``; overrides ``config.loss``.
    resume : bool
        Continue from ``out_dir/checkpoint.pt`` when it exists (a finished run returns at once).
    stop_after : int, optional
        Return after this epoch as if interrupted (the checkpoint is written first); for tests and
        for splitting long runs.
    desc : str
        Label of the progress bar.

    Returns
    -------
    FitResult
    """
    from tqdm import tqdm  # text bars render in the HTML reports; widget bars do not

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but torch sees no CUDA GPU; pass device='cpu'")
    if len(train) == 0:
        raise ValueError("the training set is empty; check the subjects of this fold")
    batcher = get_batcher(batcher if batcher is not None else config.batcher)
    loss_fn = loss_fn if loss_fn is not None else LOSSES[config.loss]
    out_dir = Path(out_dir) if out_dir is not None else None
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    seed_everything(config.seed)
    if config.weight_init == "attnsleep_normal":
        from sleeplib.models.blocks import init_weights_normal

        model.apply(init_weights_normal)
    model.to(device)
    optimizer = build_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights is not None else None

    rows: list[dict] = []
    start_epoch, best_epoch, best_score = 1, 0, float("nan")
    best_state: dict = {}
    best_probs: np.ndarray | None = None
    since_best, stopped_early, finished = 0, False, False
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _check_resumable(ckpt["config"], config, ckpt_path)
        rows = ckpt["history"]
        start_epoch = ckpt["epoch"] + 1
        best_epoch, best_score = ckpt["best_epoch"], ckpt["best_score"]
        best_state, best_probs = ckpt["best_state"], ckpt["best_probs"]
        since_best, stopped_early = ckpt["since_best"], ckpt["stopped_early"]
        finished = stopped_early or ckpt["epoch"] >= config.epochs
        if ckpt["optimizer"] is None and not finished:
            raise ValueError(
                f"the run in {out_dir} finished after {ckpt['epoch']} epochs and kept only its final weights "
                f"(no optimiser state), so it cannot continue to {config.epochs} epochs; delete {ckpt_path} "
                "to train from scratch"
            )
        model.load_state_dict(ckpt["model"] if ckpt["model"] is not None else best_state)
        if ckpt["optimizer"] is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            _set_rng_state(ckpt["rng"], generator)

    writer = _tensorboard(out_dir) if not finished else None
    val_y = val.y.numpy() if val is not None else None
    epoch = start_epoch - 1
    bar = tqdm(range(start_epoch, config.epochs + 1), desc=desc, disable=not config.progress or finished, leave=False)
    for epoch in bar:
        if finished:
            break
        t0 = time.perf_counter()
        lr = _set_lr(optimizer, config, epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen, state = 0, None
        for batch in batcher.train_batches(train, config.batch_size, generator):
            batch = type(batch)(batch.x.to(device, non_blocking=True), batch.y.to(device, non_blocking=True), batch.reset)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, config.amp):
                logits, target, state = batcher.forward(model, batch, state)
            loss = loss_fn(logits, target, weight)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            # accumulate on the device: no host sync per step
            loss_sum += loss.detach() * len(target)
            correct += (logits.detach().argmax(1) == target).sum()
            seen += len(target)
        row = {"epoch": epoch, "lr": lr, "train_loss": float(loss_sum) / seen, "train_acc": float(correct) / seen}
        if val is not None:
            probs = predict(model, val, batch_size=config.eval_batch_size, device=device, batcher=batcher, amp=config.amp)
            with torch.no_grad():
                val_loss = float(loss_fn(torch.log(torch.from_numpy(probs).clamp_min(1e-12)).to(device),
                                         val.y.to(device), weight))
            row.update(_score(config.monitor, val_y, probs, val_loss))
            score = row["val_loss" if config.monitor == "loss" else f"val_{config.monitor}"]
            if _improved(config.monitor, score, best_score):
                best_epoch, best_score, best_probs, since_best = epoch, score, probs, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
            stopped_early = config.early_stopping is not None and since_best >= config.early_stopping
        else:
            best_epoch = epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k in ("train_loss", "val_accuracy")})
        if writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch)
        last = epoch == config.epochs or stopped_early or (stop_after is not None and epoch >= stop_after)
        if out_dir is not None and (epoch % config.checkpoint_every == 0 or last):
            # A finished run only needs its result: dropping the optimiser state (and the last
            # weights when the best ones are kept) makes DeepSleepNet's checkpoint 4x smaller.
            done = epoch >= config.epochs or stopped_early
            state_dict = {
                "epoch": epoch,
                "config": config.to_dict(),
                "model": None if done and best_state else model.state_dict(),
                "optimizer": None if done else optimizer.state_dict(),
                "scheduler": {"lr_factor": lr_factor(config, epoch), "epoch": epoch},
                "rng": None if done else _rng_state(generator),
                "history": rows,
                "best_epoch": best_epoch,
                "best_score": best_score,
                "best_state": best_state,
                "best_probs": best_probs,
                "since_best": since_best,
                "stopped_early": stopped_early,
            }
            with atomic_path(ckpt_path, suffix=".pt") as tmp:
                torch.save(state_dict, tmp)
            with atomic_path(out_dir / HISTORY_NAME, suffix=".csv") as tmp:
                pd.DataFrame(rows).to_csv(tmp, index=False)
        if stopped_early or (stop_after is not None and epoch >= stop_after):
            break
    bar.close()
    if writer is not None:
        writer.close()
    if best_state:
        model.load_state_dict(best_state)
    return FitResult(
        history=pd.DataFrame(rows),
        best_epoch=int(best_epoch),
        best_score=float(best_score),
        best_state=best_state,
        val_probs=best_probs,
        stopped_early=bool(stopped_early),
    )
