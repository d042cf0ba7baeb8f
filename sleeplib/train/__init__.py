"""Training engine: configs and recipes, batching strategies, the trainer, protocols, CV runner.

Never imports ``mne`` (the GPU machines have torch but not mne). Submodules:

* :mod:`~sleeplib.train.config` - :class:`TrainConfig`, :data:`RECIPES` (``"attnsleep"``, ``"smoke"``)
* :mod:`~sleeplib.train.batching` - :class:`ArraySet`, :class:`EpochBatcher`, the batcher extension point
* :mod:`~sleeplib.train.trainer` - :func:`fit` (eager, checkpoint/resume), :func:`predict`
* :mod:`~sleeplib.train.protocols` - ``paper`` / ``clean`` / ``time-block`` splits
* :mod:`~sleeplib.train.fast` - :class:`BatchedFolds`, several folds at once on one device
* :mod:`~sleeplib.train.cv` - :func:`run_cv`, :func:`load_cv`
"""

from sleeplib.train.batching import BATCHERS, ArraySet, Batch, EpochBatcher
from sleeplib.train.config import RECIPES, TrainConfig, attnsleep_class_weights, get_recipe
from sleeplib.train.cv import CVResults, load_cv, run_cv
from sleeplib.train.protocols import PROTOCOL_LABELS, make_splits, paper_folds, time_block_splits
from sleeplib.train.trainer import LOSSES, FitResult, fit, predict

__all__ = [
    "ArraySet", "Batch", "BATCHERS", "EpochBatcher", "TrainConfig", "RECIPES", "get_recipe",
    "attnsleep_class_weights", "fit", "predict", "FitResult", "LOSSES", "make_splits", "paper_folds",
    "time_block_splits", "PROTOCOL_LABELS", "run_cv", "load_cv", "CVResults",
]
