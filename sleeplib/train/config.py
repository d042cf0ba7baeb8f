"""Training configuration: one dataclass and the named recipes of the papers.

A :class:`TrainConfig` holds only plain values (numbers, strings, dicts), so it is saved into every
checkpoint and into the run folder as JSON, and a resumed run can check it continues the same
recipe. Behaviour that is code (a sequence batcher, a model-specific loss) is chosen *by name* here
(``batcher``, ``loss``) and looked up in :data:`sleeplib.train.batching.BATCHERS` /
:data:`sleeplib.train.trainer.LOSSES`; the trainer also accepts such objects directly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["TrainConfig", "RECIPES", "get_recipe", "attnsleep_class_weights", "lr_factor"]


@dataclass
class TrainConfig:
    """Everything that decides how a model is trained.

    Parameters
    ----------
    epochs : int
        Number of passes over the training set.
    batch_size : int
        Training batch size (epochs, or sequences for a sequence batcher).
    eval_batch_size : int
        Batch size for validation/test inference (no gradients, so it can be larger).
    optimizer : {"adam", "adamw", "sgd", "rmsprop"}
        Optimiser (torch.optim). ``weight_decay`` is L2 added to the gradient for adam/sgd/rmsprop
        (as in torch.optim.Adam), decoupled for adamw.
    lr, weight_decay, betas, eps, amsgrad, momentum :
        Optimiser settings (``momentum`` for sgd only).
    rmsprop_alpha, rmsprop_eps : float
        RMSProp's decay and epsilon (TensorFlow's defaults, 0.9 and 1e-10, as SleepEEGNet used).
    param_groups : list of dict
        Per-parameter-group settings, e.g. DeepSleepNet's
        ``[{"match": "feature", "lr": 1e-6}, {"match": "lstm", "lr": 1e-4}]``: a parameter goes to
        the first group whose ``match`` substring is in its name; the rest use ``lr`` and
        ``weight_decay``. Any key other than ``match`` is an optimiser setting of that group.
    lr_schedule : {"none", "set_after", "step", "cosine"}
        ``set_after``: after each epoch ``e`` listed in ``lr_milestones`` the learning rate of every
        group is multiplied so that the default group's becomes ``lr_milestones[e]`` (AttnSleep: lr
        1e-4 after epoch 10). ``step``: multiply by ``lr_gamma`` every ``lr_step`` epochs.
        ``cosine``: cosine decay to 0 over ``epochs``.
    class_weights : {"attnsleep", "balanced", "none"} or list of float
        Weights of the cross-entropy; "attnsleep" is :func:`attnsleep_class_weights`.
    loss : str
        Name of the loss in :data:`sleeplib.train.trainer.LOSSES` (``"weighted_ce"``).
    batcher : str
        Name of the batching strategy in :data:`sleeplib.train.batching.BATCHERS` (``"epoch"``).
    grad_clip : float or None
        Clip the global gradient norm to this value (None: no clipping, as AttnSleep).
    monitor : {"accuracy", "macro_f1", "kappa", "loss"}
        Metric on the selection set (validation; the test fold in the paper protocol) that picks the
        epoch whose weights are kept. ``loss`` is minimised, the others maximised; a tie keeps the
        earlier epoch (AttnSleep's strict ``>``).
    early_stopping : int or None
        Stop when ``monitor`` has not improved for this many epochs (None: never).
    seed : int
        Seeds weight initialisation, shuffling and dropout.
    weight_init : {"model", "attnsleep_normal"}
        "model": keep the model's own initialisation (``AttnSleep`` already applies the original
        one). "attnsleep_normal": re-apply the original code's ``weights_init_normal`` (conv weights N(0, 0.02),
        BatchNorm weights N(1, 0.02)) applied after construction.
    amp : {"none", "bf16"}
        Mixed precision on CUDA (ignored on CPU). The AttnSleep recipe is fp32.
    deterministic : bool
        Ask torch for deterministic kernels (slower on CUDA; CPU runs are deterministic anyway).
    checkpoint_every : int
        Save the checkpoint every this many epochs (and always after the last one).
    progress : bool
        Show tqdm progress bars.
    """

    epochs: int = 100
    batch_size: int = 128
    eval_batch_size: int = 512
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = True
    momentum: float = 0.9
    rmsprop_alpha: float = 0.9
    rmsprop_eps: float = 1e-10
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    lr_schedule: str = "set_after"
    lr_milestones: dict[int, float] = field(default_factory=lambda: {10: 1e-4})
    lr_step: int = 30
    lr_gamma: float = 0.1
    class_weights: Any = "attnsleep"
    loss: str = "weighted_ce"
    batcher: str = "epoch"
    grad_clip: float | None = None
    monitor: str = "accuracy"
    early_stopping: int | None = None
    seed: int = 123
    weight_init: str = "model"
    amp: str = "none"
    deterministic: bool = False
    checkpoint_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        # JSON round trips turn int keys into strings and tuples into lists: normalise both.
        self.lr_milestones = {int(k): float(v) for k, v in dict(self.lr_milestones).items()}
        self.betas = tuple(float(b) for b in self.betas)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that is out of range."""
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.optimizer in ("adam", "adamw", "sgd", "rmsprop"),
             f"optimizer must be adam, adamw, sgd or rmsprop, got {self.optimizer!r}"),
            (
                self.lr_schedule in ("none", "set_after", "step", "cosine"),
                f"lr_schedule must be none, set_after, step or cosine, got {self.lr_schedule!r}",
            ),
            (self.monitor in ("accuracy", "macro_f1", "kappa", "loss"), f"monitor must be accuracy, macro_f1, kappa or loss, got {self.monitor!r}"),
            (self.amp in ("none", "bf16"), f"amp must be 'none' or 'bf16', got {self.amp!r}"),
            (self.weight_init in ("model", "attnsleep_normal"), f"weight_init must be 'model' or 'attnsleep_normal', got {self.weight_init!r}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be None or > 0, got {self.grad_clip}"),
            (self.early_stopping is None or self.early_stopping >= 1, f"early_stopping must be None or >= 1, got {self.early_stopping}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (
                isinstance(self.class_weights, (list, tuple, np.ndarray))
                or self.class_weights in ("attnsleep", "balanced", "none", None),
                f"class_weights must be 'attnsleep', 'balanced', 'none' or a list, got {self.class_weights!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")
        for group in self.param_groups:
            if "match" not in group:
                raise ValueError(f"TrainConfig: each param_groups entry needs a 'match' substring, got {group}")

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some settings changed (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-value dict (JSON-serialisable)."""
        out = dataclasses.asdict(self)
        if isinstance(out["class_weights"], np.ndarray):
            out["class_weights"] = out["class_weights"].tolist()
        out["betas"] = list(out["betas"])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError`` listing them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown settings {unknown}; known are {sorted(names)}")
        return cls(**values)

    # Settings that may differ between a checkpoint and the run resuming it without changing what
    # has been computed so far (more epochs, a progress bar).
    RESUMABLE_CHANGES = ("epochs", "progress", "checkpoint_every", "early_stopping")


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """Multiplier of every group's base learning rate during 1-based training epoch ``epoch``.

    A pure function of the epoch, so a resumed run recomputes the schedule exactly.
    """
    if config.lr_schedule == "none":
        return 1.0
    if config.lr_schedule == "set_after":
        factor = 1.0
        for milestone in sorted(config.lr_milestones):
            if epoch > milestone:
                factor = config.lr_milestones[milestone] / config.lr
        return factor
    if config.lr_schedule == "step":
        return config.lr_gamma ** ((epoch - 1) // config.lr_step)
    # cosine, evaluated at the start of the epoch
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / config.epochs))


def attnsleep_class_weights(counts, mu=(1.5, 2.0, 1.5, 1.0, 1.5)) -> list[float]:
    """AttnSleep's class weights (``calc_class_weight`` in their utils/util.py).

    ``w_k = round(mu_k * max(1, ln(mu_k * M / M_k)), 2)`` with ``mu_k = mu[k] / K`` (K classes,
    M the total count, M_k the count of class k). The default ``mu`` is the current version of their
    code, commented "for Sleep-EDF-20 only" there; an earlier version used (2, 3, 2, 1, 2) / K and
    multiplied by 1/K instead of mu_k.

    Parameters
    ----------
    counts : array-like of int
        Number of epochs per class, in label order. Their code passes train+test counts.
    mu : sequence of float
        Per-class scale before the division by K.

    Raises
    ------
    ValueError
        If a count is zero (the log would be infinite) or the lengths differ.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) != len(mu):
        raise ValueError(f"got {len(counts)} class counts but {len(mu)} mu values; pass one per class")
    if np.any(counts <= 0):
        raise ValueError(
            f"every class needs at least one epoch for AttnSleep's weights, got counts {counts.tolist()}; "
            "use class_weights='balanced' or 'none' on data missing a stage"
        )
    total = counts.sum()
    scale = np.asarray(mu, dtype=np.float64) / len(counts)
    weights = []
    for k in range(len(counts)):
        score = max(1.0, math.log(scale[k] * total / counts[k]))
        weights.append(round(score * scale[k], 2))
    return weights


RECIPES: dict[str, TrainConfig] = {
    # Eldele et al. 2021, config.json + trainer/trainer.py of emadeldeen24/AttnSleep.
    "attnsleep": TrainConfig(),
    # Few epochs on tiny data: CI and the 'smoke' profile.
    "smoke": TrainConfig(epochs=2, batch_size=32, eval_batch_size=128, lr_milestones={1: 1e-4}, progress=False),
}


def get_recipe(name: str, **overrides: Any) -> TrainConfig:
    """A named recipe from :data:`RECIPES`, with some settings overridden.

    Raises
    ------
    KeyError
        If ``name`` is not a recipe; the message lists the known ones.
    """
    if name not in RECIPES:
        raise KeyError(f"unknown training recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name].replace(**overrides)
